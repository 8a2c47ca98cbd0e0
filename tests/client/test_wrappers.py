"""Wrappers that change what the job's optimizer and scheduler act on: FSDP2's ``fully_shard`` (it
replaces the model's parameters) must come before ``autoconfigure``; a scheduler stepped more than
once per optimizer step (HF Accelerate's ``prepare(..., job.scheduler)`` on 2 ranks,
``accelerate_worker.py``) is refused before the step that would use a wrong LR."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from largebatch.client import Client, JobError  # noqa: E402

from ._training import REFERENCE, Data, make_model  # noqa: E402

pytestmark = pytest.mark.slow  # against a `largebatch serve` subprocess (conftest.py)

HERE = Path(__file__).parent


@pytest.fixture
def one_rank_group():
    """A process group of one rank (FSDP2 needs one), gone after the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def step(job, model, data: Data) -> None:
    x, y = data.batch(job.recipe.stages[0].batch_size)
    torch.nn.functional.mse_loss(model(x), y).backward()
    job.optimizer.step()
    job.scheduler.step()
    job.optimizer.zero_grad()


def test_fully_shard_after_autoconfigure_is_refused_before_the_first_step(service, one_rank_group):
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    job = Client(service.url).autoconfigure(model, study="fsdp2-order", reference=REFERENCE, target_batch_size=128)
    fully_shard(model)  # the wrong order: the optimizer holds the parameters fully_shard replaced
    before = [p.full_tensor().clone() for p in model.parameters()]
    with pytest.raises(JobError, match=r"fully_shard\(model\).*then client.autoconfigure"), job:
        step(job, model, Data())
    assert all(torch.equal(a, p.full_tensor()) for a, p in zip(before, model.parameters(), strict=True))
    assert service.store.get_run(job.run.id).state == "failed"

    model = make_model()
    fully_shard(model)  # the right order
    job = Client(service.url).autoconfigure(model, study="fsdp2-order", reference=REFERENCE, target_batch_size=128)
    before = [p.full_tensor().clone() for p in model.parameters()]
    with job:
        step(job, model, Data())
        job.fail("one step was enough")
    assert not all(torch.equal(a, p.full_tensor()) for a, p in zip(before, model.parameters(), strict=True))


def test_accelerate_prepare_with_the_job_scheduler(service, tmp_path):
    pytest.importorskip("accelerate")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LARGEBATCH_JOB")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           str(HERE / "accelerate_worker.py"), service.url, str(tmp_path)],
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for rank in range(2):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # prepare(..., job.scheduler): refused at the second step, before an LR 2 steps ahead is used
        assert "AcceleratedScheduler" in out["refused"] and out["refused_at"] == 1
        # the way the error names: the recipe's LR before every optimizer step
        assert out["lrs"] == out["recipe_lrs"]
