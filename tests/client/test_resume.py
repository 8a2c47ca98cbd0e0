"""Resuming a run from a checkpoint (``job.state_dict()`` with the optimizer's and scheduler's):
after SIGKILL the job reattaches to the same run (still running) and ends it once; after an exception
(the run ended ``failed``) resuming is refused before the first step unless asked as a new attempt,
which is a new run linked to the failed one. Reattaching through a reused idempotency key to a run
that ended is refused too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from largebatch.client import Client, JobError  # noqa: E402

from ._training import REFERENCE, Data, evaluate, make_model, train  # noqa: E402

pytestmark = pytest.mark.slow  # against a `largebatch serve` subprocess (conftest.py)

ROOT = Path(__file__).parents[2]


def resumed(client, ckpt: dict, **kwargs):
    model = make_model()
    model.load_state_dict(ckpt["model"])
    job = client.autoconfigure(model, study=ckpt["job"]["study"], reference=REFERENCE, target_batch_size=128,
                               resume=ckpt["job"], job_options={"flush_interval": 0.05}, **kwargs)
    job.optimizer.load_state_dict(ckpt["optimizer"])
    job.scheduler.load_state_dict(ckpt["scheduler"])
    return job, model


@pytest.mark.parametrize("flush_interval", ["0.05", "3600"])
def test_resume_after_sigkill_continues_the_same_run(service, tmp_path, flush_interval):
    """Every step reported once in the end: the steps delivered before the kill, those the checkpoint
    carried undelivered (all of them with a flush interval longer than the run), and those trained again."""
    study = f"resume-kill-{flush_interval}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "resume_worker.py"), service.url,
                             str(tmp_path), study, flush_interval], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (tmp_path / "ckpt.pt").exists() and torch.load(tmp_path / "ckpt.pt")["job"]["step"] >= 19:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # a few steps past the checkpoint, reported: they are trained and reported again
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    run_id = ckpt["job"]["run"]
    assert service.store.get_run(run_id).state == "running"  # nobody ended it
    if flush_interval == "3600":
        assert service.store.reports(run_id) == []
        assert [r["step"] for r in ckpt["job"]["reports"]] == list(range(ckpt["job"]["step"] + 1))

    client = Client(service.url)
    job, model = resumed(client, ckpt)
    assert job.run.id == run_id
    data = Data()
    data.gen.set_state(ckpt["data"])
    with job:
        train(job, model, job.recipe.total_steps, data, start=ckpt["job"]["step"] + 1)
        job.complete(evaluate(model))
    runs = service.store.list_runs("default", study).items
    assert [(r.id, r.state) for r in runs] == [(run_id, "completed")]
    assert [r.step for r in service.store.reports(run_id)] == list(range(job.recipe.total_steps))


def test_resume_after_an_exception_is_a_new_attempt_linked_to_the_failed_run(service):
    client = Client(service.url)
    model, data = make_model(), Data()
    job = client.autoconfigure(model, study="resume-exception", reference=REFERENCE, target_batch_size=128,
                               idempotency_key="resume-exception-1", job_options={"flush_interval": 0.05})
    total = job.recipe.total_steps
    with pytest.raises(RuntimeError), job:
        train(job, model, 10, data)
        ckpt = {"job": job.state_dict(), "model": {k: v.clone() for k, v in model.state_dict().items()},
                "optimizer": job.optimizer.state_dict(), "scheduler": job.scheduler.state_dict()}
        raise RuntimeError("out of memory")
    failed = service.store.get_run(job.run.id)
    assert failed.state == "failed"

    # the same idempotency key, or resume without new_attempt: refused before the first step
    with pytest.raises(JobError, match=r"is failed: it takes no more reports.*resume=state"):
        client.autoconfigure(make_model(), study="resume-exception", reference=REFERENCE, target_batch_size=128,
                             idempotency_key="resume-exception-1")
    with pytest.raises(JobError, match=r"is failed: it takes no more reports.*new_attempt=True.*from step 10"):
        resumed(client, ckpt)

    job, model = resumed(client, ckpt, new_attempt=True)
    with job:
        train(job, model, total, data, start=10)
        job.complete(evaluate(model))
    attempt = service.store.get_run(job.run.id)
    assert attempt.id != failed.id and attempt.state == "completed"
    assert attempt.environment["resumes_run"] == failed.id and attempt.environment["attempt"] == 2
    assert [r.step for r in service.store.reports(failed.id)] == list(range(10))
    assert [r.step for r in service.store.reports(attempt.id)] == list(range(10, total))


def test_sigterm_delivers_every_report_and_records_the_run_preempted(service, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "preempt_worker.py"), service.url,
                             str(tmp_path)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (tmp_path / "last").exists() and (tmp_path / "last").read_text() not in ("", "0", "1", "2"):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what SLURM and Kubernetes send: the flush interval (1 s) has not passed
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr[-3000:]
    runs = service.store.list_runs("default", "preempt").items
    assert len(runs) == 1
    run = runs[0]
    assert run.state == "preempted" and "SIGTERM" in (run.reason or ""), (run.state, run.reason)
    steps = [r.step for r in service.store.reports(run.id)]
    assert steps == list(range(len(steps))) and steps[-1] >= int((tmp_path / "last").read_text())
