"""Trains until the test sends SIGTERM (``preempt_worker.py URL OUT``), writing the last step it
reported to OUT/last after each report."""

from __future__ import annotations

import os
import sys
import time

import torch

from largebatch.client import Client
from tests.client._training import REFERENCE, Data, make_model, train


def main(url: str, out: str) -> None:
    torch.set_num_threads(1)
    model, data = make_model(), Data()
    job = Client(url).autoconfigure(model, study="preempt", reference=REFERENCE, target_batch_size=128,
                                    job_options={"flush_interval": 1.0})
    def reported(step: int) -> None:
        with open(os.path.join(out, "last"), "w") as f:
            f.write(str(step))
        time.sleep(0.02)

    with job:
        train(job, model, job.recipe.total_steps, data, on_step=reported)
        job.complete(0.0)


if __name__ == "__main__":
    main(*sys.argv[1:3])
