"""Trains ``test_resume``'s job in a process the test kills with SIGKILL (``resume_worker.py URL OUT``):
a checkpoint (model, optimizer, scheduler and the job's state_dict) every 5 steps, at OUT/ckpt.pt.
``resume_worker.py URL OUT STUDY FLUSH_INTERVAL``: with a long flush interval no report is delivered before
the kill, and the steps up to the checkpoint reach the service only through the checkpoint."""

from __future__ import annotations

import os
import sys
import time

import torch

from largebatch.client import Client
from tests.client._training import REFERENCE, Data, make_model, train


def main(url: str, out: str, study: str, flush_interval: str) -> None:
    torch.set_num_threads(1)
    model, data = make_model(), Data()
    job = Client(url).autoconfigure(model, study=study, reference=REFERENCE, target_batch_size=128,
                                    job_options={"flush_interval": float(flush_interval)})

    def checkpoint(step: int) -> None:
        if step % 5 == 4:
            torch.save({"job": job.state_dict(), "model": model.state_dict(), "optimizer": job.optimizer.state_dict(),
                        "scheduler": job.scheduler.state_dict(), "data": data.gen.get_state()},
                       os.path.join(out, "ckpt.tmp"))
            os.replace(os.path.join(out, "ckpt.tmp"), os.path.join(out, "ckpt.pt"))
        time.sleep(0.02)  # slow enough for the test to kill it mid-run

    with job:
        train(job, model, job.recipe.total_steps, data, on_step=checkpoint)


if __name__ == "__main__":
    main(*sys.argv[1:5])
