"""The README's client quick start, run as written against a real service.

``QUICKSTART`` is the text proposed for the README; once README.md has a ```python block that calls
``autoconfigure``, that block is run too (so the README cannot rot)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # against a `largebatch serve` subprocess (conftest.py)

pytest.importorskip("torch")

README = Path(__file__).resolve().parents[2] / "README.md"

QUICKSTART = textwrap.dedent('''
    import torch
    from largebatch.client import Client

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    x = torch.randn(8192, 32)
    y = x[:, :4].sum(1, keepdim=True).tanh()

    client = Client("http://127.0.0.1:8000")
    job = client.autoconfigure(model, study="quickstart", target_batch_size=1024,   # 1. ask for a recipe
                               reference={"batch_size": 64, "lr": 1e-3, "steps": 8000})
    with job:                    # an exception marks the run failed; Ctrl-C loses no report
        for step in range(job.recipe.total_steps):
            i = torch.randint(0, len(x), (1024,))
            loss = torch.nn.functional.mse_loss(model(x[i]), y[i])
            job.optimizer.zero_grad()
            loss.backward()
            job.optimizer.step()                           # 2. the recipe's LAMB ...
            job.scheduler.step()                           #    ... and its LR schedule
            job.report(step, loss)                         # 3. report, batched in the background
            if job.should_stop:                            # the service saw the loss diverge
                break
        else:
            run = job.complete(loss.item())                # final metric: here the last loss
            print(f"run {run.id} {run.state}: {run.metric:.4f} after {job.recipe.total_steps} steps")
''')


def _readme_block() -> str | None:
    if not README.exists():
        return None
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S):
        if "autoconfigure" in block:
            return block
    return None


def _run(code: str, service) -> str:
    code = code.replace("http://127.0.0.1:8000", service.url)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("source", ["proposed", "README"])
def test_quickstart_runs_as_written(service, source):
    code = QUICKSTART if source == "proposed" else _readme_block()
    if code is None:
        pytest.skip("README.md has no client quick start (a ```python block calling autoconfigure) yet")
    before = {s.name: s.n_runs for s in service.store.list_studies("default", limit=1000).items}
    _run(code, service)
    study = re.search(r'study="([^"]+)"', code).group(1)
    page = service.store.list_runs("default", study, limit=1000)
    assert page.total == before.get(study, 0) + 1  # one run opened, no more
    run = page.items[-1]
    assert run.state == "completed" and run.metric < 0.1
    assert [r.step for r in service.store.reports(run.id)] == list(range(run.steps))  # every step reported
