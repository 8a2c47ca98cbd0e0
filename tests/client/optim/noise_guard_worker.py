"""Two gloo ranks for the noise-scale guards: the bare module of a DDP model measured over the process
group (what an HF or Lightning callback holds), gradients nobody all-reduced, and a DDP loop without
``no_sync`` (every micro-batch all-reduced)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from noise_dist_worker import LOCAL_BATCH, LR, batches, make_model, run_rank
from torch import nn

from largebatch.client._dist import BatchPlan
from largebatch.client._measure import attach_noise
from largebatch.client.optim.noise_scale import GradientNoiseScale

WORLD = 2


def bare(rank: int, clip: bool = False) -> list[float | None]:
    """DDP trains; measure_noise's road is given the module the wrapper wraps. ``clip``: the gradient
    is clipped before the step (then put back, for the same update)."""
    model = nn.parallel.DistributedDataParallel(make_model())
    noise = attach_noise(model.module, BatchPlan(WORLD * LOCAL_BATCH, WORLD, LOCAL_BATCH, 1), ema=None,
                         grad_scale=None)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    values = []
    for x, y in batches():
        lo = rank * LOCAL_BATCH
        nn.functional.mse_loss(model(x[lo:lo + LOCAL_BATCH]), y[lo:lo + LOCAL_BATCH]).backward()
        if clip:
            saved = [p.grad.clone() for p in model.parameters()]
            nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        values.append(noise.step())
        if clip:
            for p, grad in zip(model.parameters(), saved, strict=True):
                p.grad.copy_(grad)
        opt.step()
        opt.zero_grad()
    return values


def unsynced(rank: int) -> str:
    """The bare module trained without DDP: each rank's .grad is its own."""
    model = make_model()
    noise = attach_noise(model, BatchPlan(WORLD * LOCAL_BATCH, WORLD, LOCAL_BATCH, 1), ema=None, grad_scale=None)
    x, y = batches()[0]
    lo = rank * LOCAL_BATCH
    nn.functional.mse_loss(model(x[lo:lo + LOCAL_BATCH]), y[lo:lo + LOCAL_BATCH]).backward()
    try:
        noise.step()
    except ValueError as e:
        return str(e)
    return ""


def without_no_sync(rank: int) -> tuple[list[float | None], list[float | None], list[str]]:
    """Two micro-batches of LOCAL_BATCH / 2 per rank and step, each all-reduced; the reference is
    computed by hand from the first micro-batch's local and all-reduced gradients."""
    model = nn.parallel.DistributedDataParallel(make_model())
    noise, reference = GradientNoiseScale(), GradientNoiseScale()
    noise.attach_ddp(model, LOCAL_BATCH)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    half = LOCAL_BATCH // 2
    values, expected = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in batches():
            lo = rank * LOCAL_BATCH
            params = list(model.module.parameters())
            local = torch.autograd.grad(nn.functional.mse_loss(model.module(x[lo:lo + half]), y[lo:lo + half]), params)
            small = sum(float(g.square().sum()) for g in local)
            total = [g.clone() for g in local]
            for g in total:
                dist.all_reduce(g)
            big = sum(float((g / WORLD).square().sum()) for g in total)
            both = torch.tensor([small], dtype=torch.float64)
            dist.all_reduce(both)
            reference.update(float(both[0]) / WORLD, big, half, half * WORLD)
            expected.append(reference.value)
            for i in range(2):
                sl = slice(lo + i * half, lo + (i + 1) * half)
                (nn.functional.mse_loss(model(x[sl]), y[sl]) / 2).backward()
            values.append(noise.step())
            opt.step()
            opt.zero_grad()
    return values, expected, [str(w.message) for w in caught]


def worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    run_rank(rank, world, init_file, out_file, lambda r: {"bare": bare(r), "clipped": bare(r, clip=True),
                                                         "unsynced": unsynced(r), "no_sync": without_no_sync(r)})
