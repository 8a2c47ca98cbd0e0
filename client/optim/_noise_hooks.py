"""Where :class:`~largebatch.client.optim.GradientNoiseScale` reads its two squared norms from a training
loop, and the checks that keep a loop it does not understand from being read silently wrong.

* :class:`AccumulationReader` (one process with accumulation, or the bare module under DDP): a tensor
  hook reads each micro-batch's gradient before it reaches ``.grad``, and the parameter's
  post-accumulate hook confirms that it did. A gradient taken with ``torch.autograd.grad`` (a
  diagnostic) fires the first and never the second, so it is not a micro-batch; one that was zeroed
  away (``zero_grad()`` before the step's micro-batches) is dropped when the next one finds ``.grad``
  None. |G_big|^2 is read at the end of the plan's last backward pass, before any clipping. Under
  several ranks the accumulated ``.grad`` is the all-reduced one: B_big counts every rank's
  examples, and each step checks that ``.grad`` is the same on every rank (else nothing all-reduced it).
* :class:`DDPReader` (a ``DistributedDataParallel`` model): a communication hook reads the local and
  the all-reduced bucket. A loop without ``no_sync`` all-reduces every micro-batch; only the first
  all-reduce of a step compares one micro-batch with its mean over the ranks, so that one is read.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from ._grad_norms import _local, _sq_norm, _weighted_sq_norm

__all__ = ["AccumulationReader", "DDPReader"]

Fold = Callable[[torch.Tensor, torch.Tensor, int, int], None]  # small, big, B_small, B_big


class AccumulationReader:
    def __init__(self, params: list[torch.Tensor], micro_batch_size: int, grad_scale: float,
                 micro_batches: int | None, group: Any, weights: Callable[[torch.Tensor], torch.Tensor | None] | None,
                 norm: Callable[[list[torch.Tensor], float], torch.Tensor | None]):
        self.params, self.batch, self.scale = params, int(micro_batch_size), float(grad_scale)
        self.expected, self.group, self.weights, self.norm = micro_batches, group, weights, norm
        self.world = 1
        if group is not None:
            import torch.distributed as dist

            self.world = dist.get_world_size(group)
        self.paused = False
        self.skipped = 0  # steps left out because they did not follow the plan
        self._warned = False
        self._pending: dict[int, torch.Tensor | None] = {}  # this backward pass's norm, until accumulated
        self._sum: dict[int, torch.Tensor] = {}
        self._count: dict[int, int] = {}
        self._big: torch.Tensor | None = None  # |.grad|^2 at the end of the last backward pass
        self._queued = False
        self._missing = False
        self.handles = []
        for p in params:
            self.handles.append(p.register_hook(lambda g, p=p: self._seen(p, g)))
            self.handles.append(p.register_post_accumulate_grad_hook(self._accumulated))

    def _seen(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        if self.paused:
            return
        key = id(p)
        if p.grad is None and self._count.get(key):
            # .grad was set to None since the last backward: what that pass accumulated is gone
            self._sum.pop(key, None)
            self._count[key] = 0
        g = _local(grad)
        if self.weights is None:
            self._pending[key] = _sq_norm(g)
            return
        w = self.weights(p)
        self._pending[key] = None if w is None else _weighted_sq_norm(g, w)

    def _accumulated(self, p: torch.Tensor) -> None:
        sq = self._pending.pop(id(p), None)
        if self.paused:
            return
        key = id(p)
        self._count[key] = self._count.get(key, 0) + 1
        if sq is None:
            self._missing = True  # no preconditioner weights yet: the step is not measured
            return
        s = self._sum.get(key)
        self._sum[key] = sq if s is None else s + sq.to(s.device)
        if not self._queued and (self.expected is None or self._count[key] == self.expected):
            # |G_big|^2 from .grad as this backward pass leaves it, before a clip_grad_norm_ ahead of the
            # optimizer step (HF's Trainer clips by default) makes it smaller. Under DDP the reducer fills
            # .grad with the all-reduced gradient in a callback queued during the pass: a callback queued
            # from ours runs after it.
            self._queued = True
            engine = torch.autograd.Variable._execution_engine
            engine.queue_callback(lambda: engine.queue_callback(self._pass_done))

    def _pass_done(self) -> None:
        self._queued = False
        if not self.paused:
            self._big = self.norm(self.params, 1.0)

    def clear(self) -> None:
        self._pending.clear()
        self._sum.clear()
        self._count.clear()
        self._big = None
        self._missing = False

    def fold(self, update: Fold) -> None:
        counts = {c for c in self._count.values() if c}
        sums, missing = list(self._sum.values()), self._missing
        read = self._big
        self.clear()
        if not counts:
            return
        n = max(counts)
        if len(counts) > 1 or (self.expected is not None and n != self.expected):
            self.skipped += 1
            self._warn(f"{sorted(counts)} backward pass(es) accumulated into .grad since the last optimizer step"
                       + (f", where the plan trains {self.expected} micro-batch(es)" if self.expected else "")
                       + ": the step is not measured. A diagnostic gradient between optimizer steps should use "
                       "torch.autograd.grad (not counted), or zero_grad() before the step's micro-batches; a "
                       "different accumulation needs its own plan (job.batch_plan(per_device_batch_size=...))")
            return
        if missing or not sums or (n < 2 and self.world < 2):
            return
        big = self.norm(self.params, self.scale / n) if read is None else read * (self.scale / n) ** 2
        if big is None:
            return
        small = sum(s.to(sums[0].device) for s in sums) * (self.scale * self.scale) / n
        if self.world > 1:
            small, big = self._over_ranks(small, big)
        update(small, big, self.batch, self.batch * n * self.world)

    def _over_ranks(self, small: torch.Tensor, big: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch.distributed as dist

        # gloo takes CPU tensors, NCCL only CUDA ones
        device = big.device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
        t = torch.stack([small.double().to(big.device), big.double(), big.double() ** 2]).to(device)
        dist.all_reduce(t, group=self.group)
        mean_small, mean_big, mean_sq = (t / self.world).tolist()
        spread = max(mean_sq - mean_big * mean_big, 0.0) ** 0.5
        if spread > 1e-6 * abs(mean_big):
            raise ValueError(
                "the gradient the optimizer steps with differs between ranks: nothing all-reduced it, so "
                "there is no global batch to compare with. measure_noise(model, ...) needs the model that "
                "syncs the gradients: the DistributedDataParallel wrapper, or the module it wraps once wrapped")
        return torch.tensor(mean_small, dtype=torch.float64), torch.tensor(mean_big, dtype=torch.float64)

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"noise scale: {message}", RuntimeWarning, stacklevel=3)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class DDPReader:
    def __init__(self, model: Any, local_batch_size: int, group: Any):
        import torch.distributed as dist
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self.group, self.world, self.batch = group, dist.get_world_size(group), int(local_batch_size)
        self.paused = False
        self._warned = False
        self.local: torch.Tensor | None = None
        self.glob: torch.Tensor | None = None
        self.rounds = 0  # all-reduces of the whole model since the last optimizer step

        # No annotations: DDP checks them against its own types, and this module's are strings.
        def hook(_state, bucket):  # type: ignore[no-untyped-def]
            take = not self.paused and self.rounds == 0
            if take:  # before the all-reduce, which averages the buffer in place
                local = _sq_norm(bucket.buffer())
                self.local = local if self.local is None else self.local + local
            fut = default_hooks.allreduce_hook(group, bucket)
            if self.paused:
                return fut
            if take:

                def after(f):  # type: ignore[no-untyped-def]
                    reduced = f.value()[0] if isinstance(f.value(), list) else f.value()
                    sq = _sq_norm(reduced)
                    self.glob = sq if self.glob is None else self.glob + sq
                    return reduced

                fut = fut.then(after)
            if bucket.is_last():
                self.rounds += 1
            return fut

        model.register_comm_hook(None, hook)

    def fold(self, update: Fold) -> None:
        import torch.distributed as dist

        local, big, rounds = self.local, self.glob, self.rounds
        self.local = self.glob = None
        self.rounds = 0
        if big is None or local is None or self.paused:
            return
        batch = self.batch
        if rounds > 1:
            if batch % rounds:
                self._warn(f"the gradients were all-reduced {rounds} times in one optimizer step (no no_sync), "
                           f"and {batch} examples per rank do not split into {rounds} equal micro-batches: not "
                           "measured. Wrap all but the last micro-batch in model.no_sync()")
                return
            batch //= rounds
            self._warn(f"the gradients were all-reduced at each of {rounds} micro-batches (no no_sync): measured "
                       f"from the first micro-batch's all-reduce ({batch} vs {batch * self.world} examples). "
                       "model.no_sync() around all but the last micro-batch saves that communication")
        local = local.clone()
        # The mean of the ranks' local norms: each is an unbiased estimate, the mean has less noise.
        dist.all_reduce(local, group=self.group)
        update(local / self.world, big, batch, batch * self.world)

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"noise scale: {message}", RuntimeWarning, stacklevel=3)
