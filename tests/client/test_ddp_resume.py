"""Resume and preemption under DDP: two gloo ranks under ``torchrun`` (``ddp_resume_worker.py``).

* the whole job SIGKILLed past a checkpoint, then resumed from it on 2 ranks: one run, each step
  reported once, ``completed`` (the steps up to the checkpoint reach the service only through it);
* an exception on the ranks: the run ``failed``; resuming it is refused on every rank (rank 1 gets rank
  0's error instead of waiting for a recipe for good), and ``new_attempt=True`` is a new run linked to
  it, ``completed``, each step once over the two;
* SIGTERM to rank 0 only (what SLURM and Kubernetes send): both ranks leave at the same step, every
  report delivered, the run ``preempted`` at that step, both processes exit as preempted.

Each waits for what the worker says it reached (a file it writes at a given step), never a time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

pytestmark = pytest.mark.slow  # two training processes and a `largebatch serve` subprocess

WORKER = Path(__file__).parent / "ddp_resume_worker.py"
ROOT = Path(__file__).parents[2]


def start(service, study: str, out: Path, mode: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LARGEBATCH_JOB")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                             str(WORKER), service.url, study, str(out), mode],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, out: Path, rc: int | None = 0) -> list[dict]:
    output, _ = proc.communicate(timeout=120)
    if rc is not None:
        assert proc.returncode == rc, output[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def wait_for(proc: subprocess.Popen, *files: Path) -> None:
    deadline = time.monotonic() + 120
    while not all(f.exists() and f.read_text() for f in files):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the worker did not reach {[f.name for f in files]}:\n{proc.communicate()[0][-6000:]}")
        time.sleep(0.05)


def test_sigkill_of_the_whole_job_then_resume_on_two_ranks(service, tmp_path):
    study = "ddp-resume-kill"
    proc = start(service, study, tmp_path, "kill")
    pids = [tmp_path / f"rank{r}.pid" for r in range(2)]
    wait_for(proc, *pids)  # both ranks past the checkpoint (step 9) at step 12
    for pid in pids:
        os.kill(int(pid.read_text()), signal.SIGKILL)
    proc.kill()
    proc.communicate(timeout=30)
    (run,) = service.store.list_runs("default", study).items
    assert run.state == "running" and service.store.reports(run.id) == []  # nothing delivered, nobody ended it

    ranks = finish(start(service, study, tmp_path, "resume"), tmp_path)
    total = ranks[0]["total_steps"]
    assert [r["run"] for r in ranks] == [run.id, run.id] and [r["world"] for r in ranks] == [2, 2]
    assert [r["last"] for r in ranks] == [total - 1, total - 1]
    runs = service.store.list_runs("default", study).items
    assert [(r.id, r.state) for r in runs] == [(run.id, "completed")]
    assert [r.step for r in service.store.reports(run.id)] == list(range(total))


def test_exception_then_resume_as_a_linked_attempt_on_two_ranks(service, tmp_path):
    study = "ddp-resume-exception"
    ranks = finish(start(service, study, tmp_path, "fail"), tmp_path)
    failed = service.store.get_run(ranks[0]["run"])
    assert failed.state == "failed" and "out of memory" in failed.reason
    assert [r["raised"] for r in ranks] == ["out of memory"] * 2
    # Resuming a run that ended, without new_attempt: refused before the first step, on both ranks.
    assert "is failed: it takes no more reports" in ranks[0]["refused"]
    assert "rank 0 could not configure the job" in ranks[1]["refused"] and "new_attempt=True" in ranks[1]["refused"]

    ranks = finish(start(service, study, tmp_path, "attempt"), tmp_path)
    attempt = service.store.get_run(ranks[0]["run"])
    total = ranks[0]["total_steps"]
    assert ranks[1]["run"] == attempt.id != failed.id and attempt.state == "completed"
    assert attempt.environment["resumes_run"] == failed.id and attempt.environment["attempt"] == 2
    assert sorted(r.id for r in service.store.list_runs("default", study).items) == sorted([failed.id, attempt.id])
    assert [r.step for r in service.store.reports(failed.id)] == list(range(10))
    assert [r.step for r in service.store.reports(attempt.id)] == list(range(10, total))


def test_sigterm_to_rank_0_preempts_the_run_and_both_ranks_leave(service, tmp_path):
    study = "ddp-preempt"
    proc = start(service, study, tmp_path, "preempt")
    pid = tmp_path / "rank0.pid"
    wait_for(proc, pid)  # rank 0 waits at step 5 for the signal; rank 1 in the next step's collective
    os.kill(int(pid.read_text()), signal.SIGTERM)  # the flush interval (1 s) has not passed
    ranks = finish(proc, tmp_path, rc=None)
    # Both ranks left at the next report (step 6), as preempted (exit 143: torchrun names the code).
    assert [r.get("preempted") for r in ranks] == [True, True] and [r["last"] for r in ranks] == [6, 6]
    (run,) = service.store.list_runs("default", study).items
    assert run.state == "preempted" and "SIGTERM" in (run.reason or ""), (run.state, run.reason)
    assert [r.step for r in service.store.reports(run.id)] == list(range(7))
    assert service.store.get_run(run.id).last_step == 6
