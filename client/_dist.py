"""What a :class:`~largebatch.client.Job` needs of torch.distributed: who this process is, the
recipe handed from rank 0 to the others, and the per-report agreement (mean loss, stop, divergence).

A job under DDP, FSDP2, torchrun, Lightning's DDP strategy or HF Accelerate is one run: rank 0
asks the service and owns the run; the other ranks never talk to the service. The launcher decides
how early a process knows it is one of several:

* torchrun (and anything that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``):
  :func:`ensure_group` creates the default process group at once (the frameworks reuse it);
* Lightning's own launcher re-runs the script for ranks > 0 with ``LOCAL_RANK`` set, and creates
  the group only inside ``fit``: rank 0 cannot know yet that it has peers, so the hand-over
  waits for :meth:`Job.sync`, which the integrations call once the group exists.

torch is imported lazily: a process that never trains never imports it.
"""

from __future__ import annotations

import atexit
import math
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

__all__ = ["PREEMPTED", "BatchPlan", "Identity", "agree", "broadcast", "ensure_group", "identity", "plan_batch", "total", "world"]

_ENV_COMPLETE = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Identity:
    """Who this process is before (or without) a process group."""

    follower: bool  # certainly not rank 0: it must get the recipe from rank 0
    world_size: int  # as far as the environment says (1 when it says nothing)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def identity() -> Identity:
    """From the process group when there is one, else from the launcher's environment."""
    dist = _dist()
    if dist is not None and dist.is_initialized():
        return Identity(follower=dist.get_rank() != 0, world_size=dist.get_world_size())
    ranks = [_env_int(n) for n in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")]
    return Identity(follower=any(r not in (None, 0) for r in ranks), world_size=_env_int("WORLD_SIZE") or 1)


def _dist() -> Any:
    """torch.distributed if torch is already loaded (a job with a model has loaded it), else None."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() else None


_EXIT_BARRIER_S = 30
_GIL_GRACE_S = 0.2

# The process group a job agreed over, kept by this module until the interpreter exits. Gloo
# runs each collective on a worker thread that, once the collective is over, frees its tensors;
# freeing one whose Python object is already gone needs the GIL. The group's destructor joins
# those threads, and it runs wherever the group's last reference goes: typically a DDP model (its
# reducer holds the group) garbage-collected right after the training script's final
# ``barrier(); destroy_process_group()``, on the main thread, holding the GIL. A worker thread still
# freeing the barrier's prior collective then waits for the GIL and the main thread for the worker:
# that rank hangs for good while the others exit. Held here, the group outlives the framework
# objects; at exit this module lets it go after a pause that hands the GIL to such a thread.
_held: list[Any] = []


def _hold_group(dist: Any) -> None:
    group = dist.group.WORLD
    if group is None or any(g is group for g in _held):
        return
    if not _held:
        atexit.register(_release_groups)  # registered first, run last (after _destroy_own_group's barrier)
    _held.append(group)


def _release_groups() -> None:
    import time

    time.sleep(_GIL_GRACE_S)  # the GIL is free meanwhile: gloo's threads finish freeing their tensors
    _held.clear()


def ensure_group() -> bool:
    """True when a process group of several ranks exists, creating the default one from a complete
    torchrun-style environment (the frameworks then find it and reuse it)."""
    dist = _dist()
    if dist is None:
        return False
    if not dist.is_initialized():
        if any(n not in os.environ for n in _ENV_COMPLETE) or (_env_int("WORLD_SIZE") or 1) < 2:
            return False
        # cpu:gloo always (the recipe hand-over and the report agreement are CPU tensors), cuda:nccl
        # where there are GPUs, as torch's own default would pick.
        import torch

        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        _hold_group(dist)
        # The group is ours, so is its teardown: a gloo group still alive at interpreter exit can abort
        # the process ("terminate called without an active exception") after a clean run.
        atexit.register(_destroy_own_group)
    if dist.get_world_size() < 2:
        return False
    _hold_group(dist)
    return True


def _destroy_own_group() -> None:
    dist = _dist()
    if dist is None or not dist.is_initialized():
        return
    # The ranks leave together (gloo torn down while a peer still talks can abort the process); a
    # rank that died must not hang the others' exit, hence the bounded barrier.
    try:
        dist.monitored_barrier(timeout=timedelta(seconds=_EXIT_BARRIER_S))
    except Exception:  # exiting anyway: a missing peer is reported by the launcher
        pass
    dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    dist = _dist()
    if dist is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _device() -> Any:
    import torch
    import torch.distributed as dist

    # NCCL-only groups take CUDA tensors; anything with gloo takes CPU ones.
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast(obj: Any) -> Any:
    """``obj`` of rank 0, on every rank."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_device())
    return box[0]


PREEMPTED = 2  # the stop vote of a rank that got SIGTERM (1: any other stop)


def agree(loss: Any, grad_norm: Any, stop: int, skipped: int,
          examples: Any = None) -> tuple[float, float | None, int, int]:
    """One all-reduce per report: the loss over ranks (the mean, or weighted by ``examples``: what each
    rank's loss averages over), the mean gradient norm, whether any rank says stop (rank 0 knows what
    the service said; :data:`PREEMPTED` if any rank was preempted, else 1 or 0), and the most steps
    skipped on any rank."""
    import torch
    import torch.distributed as dist

    def num(x: Any) -> float:
        return float(x.detach().double().item()) if hasattr(x, "detach") else float(x)

    world_size = dist.get_world_size()
    g = num(grad_norm) if grad_norm is not None else math.nan
    w = 1.0 if examples is None else num(examples)
    # Slots: weighted loss, weight, norm, stop votes, skipped steps (the same count on every rank under
    # DDP: the optimizer decides from the all-reduced gradient), ranks that gave a norm, preempted ranks.
    t = torch.tensor([num(loss) * w if w else 0.0, w, 0.0 if math.isnan(g) else g, 1.0 if stop else 0.0,
                      float(skipped), 1.0 if grad_norm is not None else 0.0, 1.0 if stop == PREEMPTED else 0.0],
                     dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    s = t.tolist()
    mean_norm = s[2] / world_size if s[5] == world_size else None
    verdict = PREEMPTED if s[6] > 0 else int(s[3] > 0)
    return s[0] / s[1] if s[1] else math.nan, mean_norm, verdict, round(s[4] / world_size)


def total(values: list[Any]) -> list[float]:
    """The sums over ranks of a few numbers (a collective: every rank calls it)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


@dataclass(frozen=True)
class BatchPlan:
    """How the recipe's global batch is trained: ``per_device x accumulation x world_size``."""

    global_batch: int
    world_size: int
    per_device: int
    accumulation: int

    def __post_init__(self) -> None:
        if self.per_device * self.accumulation * self.world_size != self.global_batch:
            raise ValueError(f"{self.per_device} per device x {self.accumulation} accumulation x "
                             f"{self.world_size} ranks != the recipe's batch {self.global_batch}")


def plan_batch(global_batch: int, world_size: int, per_device_max: int | None = None) -> BatchPlan:
    """The largest per-device batch <= ``per_device_max`` that splits ``global_batch`` evenly over
    ``world_size`` ranks and a whole number of accumulation steps.

    Raises:
        ValueError: the global batch does not split over the ranks, or a bad argument.
    """
    for name, value in (("global_batch", global_batch), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if per_device_max is not None and (isinstance(per_device_max, bool) or not isinstance(per_device_max, int)
                                       or per_device_max < 1):
        raise ValueError(f"per_device_batch_size must be an int >= 1, got {per_device_max!r}")
    if global_batch % world_size:
        raise ValueError(f"the recipe's batch {global_batch} does not split over {world_size} ranks: ask for a "
                         f"target_batch_size that is a multiple of {world_size}")
    per_rank = global_batch // world_size
    limit = per_rank if per_device_max is None else min(per_device_max, per_rank)
    per_device = next(d for d in range(limit, 0, -1) if per_rank % d == 0)
    return BatchPlan(global_batch, world_size, per_device, per_rank // per_device)
