"""The README runs as written (issue #15): every ```bash and ```python block in README.md is executed.

A block that needs a running service gets one: `largebatch serve` on a free loopback port, with
``:8000`` in the block pointed at it. A block that cannot run here says so in an HTML comment just
above it (``<!-- readme-test: skip: why -->``), which this test reads and reports; the reasons are
asserted to be there, so a block cannot be skipped silently. Other markers:
``<!-- readme-test: serve -->`` (the block starts the service itself: it is run until the service
answers, then stopped); ``<!-- readme-test: torchrun -->`` (a python block run as
``torchrun --nproc_per_node=2`` on CPU).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"(?:<!-- readme-test: (?P<marker>[^>]*?) -->\n)?```(?P<lang>bash|python)\n(?P<body>.*?)```", re.S)


def blocks() -> list[tuple[int, str, str, str]]:
    text = README.read_text()
    out = []
    for m in FENCE.finditer(text):
        line = text[: m.start("body")].count("\n")
        out.append((line, m.group("lang"), m.group("marker") or "", m.group("body")))
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """`largebatch serve` as the README starts it, on a free port, with a fresh SQLite store."""
    port = _free_port()
    store = tmp_path_factory.mktemp("readme") / "readme.db"
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "largebatch"), "serve", "--port", str(port), "--store",
                             f"sqlite:///{store}", "--no-access-log"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    _wait(base, proc)
    yield port, base
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def _wait(base: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the service exited with {proc.returncode}")
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the service did not come up")


def _point(body: str, port: int) -> str:
    return body.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("localhost:8000", f"localhost:{port}")


def test_every_block_is_run_or_says_why_not():
    found = blocks()
    assert len(found) >= 5
    for line, _lang, marker, _body in found:
        if marker.startswith("skip"):
            assert len(marker.split(":", 1)[-1].strip()) > 10, f"README line {line}: a skip needs its reason"


@pytest.mark.parametrize("line, body", [(b[0], b[3]) for b in blocks() if b[1] == "python" and not b[2].startswith("skip")])
def test_python_blocks_pass_the_linter(line, body):
    """Saved into the repository, a README snippet must not fail `scripts/test.sh` at ruff."""
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "ruff"), "check", "--stdin-filename",
                           str(ROOT / "readme_snippet.py"), "-"], input=body, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, f"README line {line}:\n{proc.stdout}"


@pytest.mark.parametrize("line, lang, marker, body", blocks(), ids=[f"README:{b[0]}" for b in blocks()])
def test_block_runs(line, lang, marker, body, service, tmp_path):
    if marker.startswith("skip"):
        pytest.skip(f"README line {line}: {marker.split(':', 1)[-1].strip()}")
    port, _ = service
    # A block that writes outside the checkout writes under $TMPDIR (or /tmp): here, the test's own directory.
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    if marker == "serve":
        # The block starts the service itself: run it on another port until it answers, then stop it.
        own = _free_port()
        cmd = body.strip().replace("largebatch serve", f"largebatch serve --port {own} --store "
                                                       f"sqlite:///{tmp_path / 'own.db'}")
        proc = subprocess.Popen(["bash", "-c", cmd], cwd=ROOT, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait(f"http://127.0.0.1:{own}", proc, timeout=600)
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(30)
        return
    work = tmp_path / "work"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".venv", ".git", "*.db", "__pycache__", "node_modules"),
                    symlinks=True)
    os.symlink(ROOT / ".venv", work / ".venv")
    before = set(work.rglob("*"))
    code = _point(body, port)
    if lang == "bash":
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    elif marker == "torchrun":
        script = work / "train.py"
        script.write_text(code)
        before.add(script)  # the test's own copy of the block
        cmd = [str(ROOT / ".venv" / "bin" / "torchrun"), "--nproc_per_node=2", "--master_port", str(_free_port()),
               str(script)]
        env["OMP_NUM_THREADS"] = "1"
    else:
        cmd = [str(ROOT / ".venv" / "bin" / "python"), "-c", code]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"README line {line} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # Examples write outside the checkout (the temp directory), never into it.
    left = sorted(str(p.relative_to(work)) for p in set(work.rglob("*")) - before
                  if "__pycache__" not in p.parts and not any(part.endswith(".egg-info") for part in p.parts))
    assert not left, f"README line {line} wrote into the checkout: {left}"


def test_lans_area_gap_in_the_readme_is_what_the_engine_prints():
    import json

    from largebatch.scaling_rules import RecommendationRequest, recommend

    text = README.read_text()
    request = json.loads(re.search(r'```json\n(\{"model".*?)```', text, re.S).group(1))
    recipe = recommend(RecommendationRequest.model_validate(request))
    line = next(r for r in recipe.rationale if "area under the LR curve" in r)
    gap, without = re.findall(r"-?\d+\.\d+", line.split("schedule", 1)[1])[:2]
    said = f"area gap of {gap} to the uncapped schedule with the constant phase, {without} without"
    assert said in " ".join(text.split()), f"the README should say: {said}"


def test_quickstart_reports_arrive_during_training(service, tmp_path):
    """The client quick start with the default intervals, run 8x longer: the run's last reported step
    is seen moving while the job still trains (reports used to wait for the heartbeat)."""
    port, base = service
    (body,) = [b for _, lang, _, b in blocks() if lang == "python" and 'study="quickstart"' in b]
    # The quick start trains its 500 steps in under a second on a quiet machine, inside one flush interval
    # (1 s, the default kept here): 8x the reference's steps gives a run that outlasts several.
    assert '"steps": 8000}' in body
    code = _point(body, port).replace('study="quickstart"', 'study="quickstart-live"').replace(
        '"steps": 8000}', '"steps": 64000}')
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "python"), "-c", code], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[tuple[int, str]] = []
    while proc.poll() is None:
        try:
            runs = httpx.get(f"{base}/v1/studies/quickstart-live/runs", timeout=2).json()
        except (httpx.TransportError, ValueError):
            runs = {}
        for r in runs.get("items", []):
            if r.get("last_step") is not None:
                seen.append((r["last_step"], r["state"]))
        time.sleep(0.1)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    mid = [step for step, state in seen if state == "running"]
    assert mid, f"no report arrived while the job trained (seen: {seen[-5:]})\n{out}"
    assert "completed" in out
    # Quiet by default: the snippet's basicConfig(INFO) shows the job's progress, not a line per request
    # (nor the 404 of the study's first recommendation, which the client answers by creating it).
    assert "HTTP Request" not in err and "404" not in err, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("largebatch: step ")], err[-3000:]
