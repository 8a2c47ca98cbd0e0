"""The public surface of largebatch.client, and what importing it costs."""

from __future__ import annotations

import subprocess
import sys

import pytest

import largebatch.client as client


def test_every_exported_name_exists():
    assert sorted(client.__all__) == sorted(set(client.__all__))
    for name in client.__all__:
        assert getattr(client, name) is not None, name


def test_the_contract_models_are_the_shared_ones():
    from largebatch.scaling_rules import models, wire

    assert client.Run is wire.Run and client.Study is wire.Study and client.Recipe is models.Recipe
    assert client.ERROR_TYPES is wire.ERROR_TYPES


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True, timeout=120)
    return set(out.stdout.split())


def test_importing_the_client_and_its_cli_loads_no_torch_and_no_framework():
    mods = _modules_after("import largebatch.client, largebatch.client.cli, largebatch.client.integrations")
    tops = {m.split(".")[0] for m in mods}
    assert not tops & {"torch", "transformers", "lightning", "fastapi", "optuna", "sqlalchemy", "uvicorn"}
    assert not any(m.startswith("largebatch.service") for m in mods)


def test_family_is_inferred_from_the_modules():
    torch = pytest.importorskip("torch")
    from largebatch.client._autoconfigure import build_request, infer_family

    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    lm = torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.TransformerEncoderLayer(16, 2, batch_first=True))
    assert (infer_family(mlp), infer_family(cnn), infer_family(lm)) == ("other", "cnn", "transformer")
    ref = {"batch_size": 64, "lr": 1e-3, "steps": 100}
    assert build_request(mlp, study="s", reference=ref, target_batch_size=128).model.family == "other"
    assert build_request(mlp, study="s", reference=ref, target_batch_size=128,
                         model_family="transformer").model.family == "transformer"
