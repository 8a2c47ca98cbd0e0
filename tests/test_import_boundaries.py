"""The layering rules of DEVELOPERS.md, checked in fresh interpreters."""

import subprocess
import sys

import pytest


def _loaded_after(code: str) -> set[str]:
    probe = code + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.split())


def _top(mods: set[str]) -> set[str]:
    return {m.split(".")[0] for m in mods}


FORBIDDEN_IN_RULES = {"torch", "fastapi", "optuna", "sqlalchemy", "httpx", "starlette", "uvicorn"}


def test_scaling_rules_imports_no_framework():
    mods = _loaded_after("import largebatch.scaling_rules, largebatch.scaling_rules.cli, "
                         "largebatch.scaling_rules.engine, largebatch.scaling_rules.schedule")
    assert not (_top(mods) & FORBIDDEN_IN_RULES), _top(mods) & FORBIDDEN_IN_RULES
    assert not any(m.startswith(("largebatch.service", "largebatch.client")) for m in mods)


def test_client_imports_no_service_and_no_torch():
    mods = _loaded_after("import largebatch.client")
    assert not any(m.startswith("largebatch.service") for m in mods)
    assert not (_top(mods) & {"torch", "fastapi", "optuna", "sqlalchemy", "uvicorn"})


def test_client_optim_is_where_torch_comes_in():
    pytest.importorskip("torch")
    mods = _loaded_after("import largebatch.client.optim")
    assert "torch" in _top(mods)
    assert not any(m.startswith("largebatch.service") for m in mods)


def _imports(path):
    import ast

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield ("." * node.level) + (node.module or "")


def test_no_lazy_imports_across_the_boundaries():
    """Source check too: an `import` inside a function would evade the probes above."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    for path in (root / "client").rglob("*.py"):
        for name in _imports(path):
            assert not name.startswith(("largebatch.service", "..service", "...service")), (path, name)
    for path in (root / "scaling_rules").rglob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            assert top not in FORBIDDEN_IN_RULES, (path, name)
            assert not name.startswith(("largebatch.service", "largebatch.client", "..")), (path, name)
