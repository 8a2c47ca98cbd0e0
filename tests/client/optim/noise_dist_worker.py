"""Gradient noise scale under DDP on 2 CPU processes (gloo), and the same data in one process with
gradient accumulation, for the noise-scale test."""

from __future__ import annotations

import gc
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from largebatch.client.optim.noise_scale import GradientNoiseScale

STEPS = 150
LOCAL_BATCH = 32
WORLD = 2
DIM = 4
LR = 0.001


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(DIM, 1).double()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global batches of WORLD * LOCAL_BATCH examples: rank r takes rows r*LOCAL_BATCH onwards."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(DIM, 1, generator=g, dtype=torch.float64)
    out = []
    for _ in range(STEPS):
        x = torch.randn(WORLD * LOCAL_BATCH, DIM, generator=g, dtype=torch.float64)
        # label noise sets tr(Sigma); the signal |G|^2 stays well above it for STEPS small steps
        out.append((x, x @ w + 1.0 * torch.randn(WORLD * LOCAL_BATCH, 1, generator=g, dtype=torch.float64)))
    return out


def train_single(first_only: bool = False) -> list[float]:
    """One process, WORLD micro-batches accumulated per step (rank r's rows are micro-batch r).

    ``first_only``: B_small from the first micro-batch alone (no hooks), the cheapest and noisiest path.
    """
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    noise = GradientNoiseScale()
    if not first_only:
        noise.attach_accumulation(model.parameters(), LOCAL_BATCH, grad_scale=WORLD)
    values = []
    for x, y in batches():
        for i in range(WORLD):
            lo = i * LOCAL_BATCH
            (nn.functional.mse_loss(model(x[lo:lo + LOCAL_BATCH]), y[lo:lo + LOCAL_BATCH]) / WORLD).backward()
            if i == 0 and first_only:
                noise.measure_small(model.parameters(), LOCAL_BATCH, grad_scale=WORLD)
        if first_only:
            noise.measure_big(model.parameters(), WORLD * LOCAL_BATCH)
        values.append(noise.step())
        opt.step()
        opt.zero_grad()
    return values


def _ddp_run(rank: int) -> dict:
    model = nn.parallel.DistributedDataParallel(make_model())
    noise = GradientNoiseScale()
    noise.attach_ddp(model, LOCAL_BATCH)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    values = []
    for x, y in batches():
        lo = rank * LOCAL_BATCH
        nn.functional.mse_loss(model(x[lo:lo + LOCAL_BATCH]), y[lo:lo + LOCAL_BATCH]).backward()
        values.append(noise.step())
        opt.step()
        opt.zero_grad()
    return {"values": values, "state": noise.state_dict(),
            "params": [p.detach().clone() for p in model.module.parameters()]}


def run_rank(rank: int, world: int, init_file: str, out_file: str, body) -> None:
    """``body(rank)`` on a gloo rank; rank 0 saves what it returns. Then both ranks leave together with
    nothing holding the group: the DDP models ``body`` made (whose reducers keep the group alive) are
    collected before the barrier, and the process ends without the interpreter's teardown. Torn down under
    a talking peer, or destroyed late by a reducer that the exit frees, gloo has aborted a rank after a
    correct run ("terminate called without an active exception", exit -6)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = body(rank)
        if rank == 0:
            torch.save(out, out_file)
        del out
    finally:
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # only after a run that raised nothing (an exception leaves through the finally, exit 1)


def worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    run_rank(rank, world, init_file, out_file, _ddp_run)
