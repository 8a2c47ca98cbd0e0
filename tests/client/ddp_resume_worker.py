"""One rank of the DDP resume and preemption tests
(``torchrun --nproc_per_node=2 ddp_resume_worker.py URL STUDY OUT MODE``): ``test_resume``'s model and
loop, wrapped in ``DistributedDataParallel``, each rank on its own data. Rank 0 checkpoints (model,
optimizer, scheduler, ``job.state_dict()``) at step 9, at OUT/ckpt.pt. MODE:

* ``kill``: trains to step 12, then every rank writes its pid to OUT/rankR.pid and waits there for the
  test's SIGKILL. The flush interval is longer than the run: no report reaches the service before the
  kill, the checkpoint's only through the checkpoint;
* ``fail``: trains to step 9, then raises on every rank inside ``with job:``; then resumes without
  ``new_attempt`` (refused on every rank: OUT/rankR.json has the errors);
* ``resume`` / ``attempt``: continues from the checkpoint (``attempt``: ``new_attempt=True``) to the
  end and completes the run;
* ``preempt``: after step 5 rank 0 writes its pid to OUT/rank0.pid and waits for the test's SIGTERM,
  then trains on: the ranks leave at the next report, as preempted (exit 143).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from largebatch.client import Client, JobError, Preempted
from tests.client._training import REFERENCE, Data, evaluate, make_model, train

CHECKPOINT_STEP = 9


def configure(url: str, study: str, model: torch.nn.Module, flush: float, **kwargs):
    # 128 examples per rank and step (the test loop's batch): a global batch of 256
    return Client(url).autoconfigure(model, study=study, reference=REFERENCE, target_batch_size=256,
                                     job_options={"flush_interval": flush}, **kwargs)


def main(url: str, study: str, out: str, mode: str) -> None:
    torch.set_num_threads(1)
    path = os.path.join(out, "ckpt.pt")
    result: dict = {}
    model = make_model()
    resuming = mode in ("resume", "attempt")
    if resuming:
        ckpt = torch.load(path)
        model.load_state_dict(ckpt["model"])
        job = configure(url, study, model, 0.05, resume=ckpt["job"], new_attempt=mode == "attempt")
        job.optimizer.load_state_dict(ckpt["optimizer"])
        job.scheduler.load_state_dict(ckpt["scheduler"])
    else:
        job = configure(url, study, model, 3600.0 if mode == "kill" else 1.0)
    rank = dist.get_rank()
    ddp = DistributedDataParallel(model)
    got_sigterm = threading.Event()

    def on_step(step: int) -> None:
        if step == CHECKPOINT_STEP and rank == 0 and not resuming:
            torch.save({"job": job.state_dict(), "model": model.state_dict(), "optimizer": job.optimizer.state_dict(),
                        "scheduler": job.scheduler.state_dict()}, path + ".tmp")
            os.replace(path + ".tmp", path)
        if mode == "kill" and step == 12:
            with open(os.path.join(out, f"rank{rank}.pid"), "w") as f:
                f.write(str(os.getpid()))
            threading.Event().wait()  # until SIGKILL
        if mode == "preempt" and step == 5 and rank == 0:
            with open(os.path.join(out, "rank0.pid"), "w") as f:
                f.write(str(os.getpid()))
            while not got_sigterm.wait(0.05):  # the signal's arrival, not a time, lets it go on
                pass
        if mode == "fail" and step == CHECKPOINT_STEP:
            raise RuntimeError("out of memory")

    data = Data(seed=1 + rank)
    start = ckpt["job"]["step"] + 1 if resuming else 0
    try:
        with job:
            if mode == "preempt":
                jobs_handler = signal.getsignal(signal.SIGTERM)  # the job's: what this test is about

                def on_sigterm(signum, frame):
                    got_sigterm.set()
                    jobs_handler(signum, frame)

                signal.signal(signal.SIGTERM, on_sigterm)
            _, losses = train(job, ddp, job.recipe.total_steps, data, on_step=on_step, start=start)
            result["last"] = start + len(losses) - 1
            if mode != "preempt":
                job.complete(evaluate(model))
    except RuntimeError as e:
        result["raised"] = str(e)
    except Preempted:
        result["preempted"] = True
        raise
    finally:
        result.update(run=job.run.id, world=dist.get_world_size(), total_steps=job.recipe.total_steps)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    if mode == "fail":
        dist.barrier()  # rank 0 has written the checkpoint
        ckpt = torch.load(path)
        try:
            configure(url, study, make_model(), 1.0, resume=ckpt["job"])
        except JobError as e:
            result["refused"] = str(e)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
