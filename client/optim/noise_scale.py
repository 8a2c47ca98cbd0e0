"""The gradient noise scale B_noise = tr(Sigma) / |G|^2, measured almost for free (issue #11).

McCandlish, Kaplan, Amodei 2018 ("An Empirical Model of Large-Batch Training", Appendix A): the
squared norm of a mean gradient over B examples has expectation ``|G|^2 + tr(Sigma) / B``. Two
batch sizes B_small < B_big seen at the same step give unbiased estimates of both terms:

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

Each per-step estimate is very noisy (|G|^2 can even come out negative), and the ratio of two noisy
estimates is biased, so numerator and denominator are smoothed *separately* with an EMA and the
ratio is taken last.

Where the two norms come from, at the cost of one norm per step and no gradient copy:

* one process with gradient accumulation: ``|G_small|^2`` from each micro-batch's gradient, read
  by tensor hooks before it is accumulated, and ``|G_big|^2`` from the accumulated gradient
  (:meth:`GradientNoiseScale.attach_accumulation`); or, with no hooks, from the gradient after the
  first micro-batch (:meth:`GradientNoiseScale.measure_small`, :meth:`GradientNoiseScale.measure_big`);
* DDP: ``|G_small|^2`` from each rank's local gradient before the all-reduce and ``|G_big|^2`` from
  the all-reduced one, read by a communication hook (:meth:`GradientNoiseScale.attach_ddp`);
* FSDP2 or any setup where the caller already has the two squared norms: :meth:`GradientNoiseScale.update`.

Per step, a training loop (or ``Job``) calls :meth:`GradientNoiseScale.step` (after measuring) or
:meth:`GradientNoiseScale.update` (with numbers) and reads :attr:`GradientNoiseScale.value`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["GradientNoiseScale", "grad_sq_norm"]


def grad_sq_norm(params: Iterable[torch.Tensor], *, scale: float = 1.0) -> torch.Tensor:
    """``scale^2 * sum |p.grad|^2`` over ``params`` as a 0-dim float64 tensor, without a gradient copy.

    DTensor (FSDP2) gradients count their local shards, summed over the mesh, so the result is the
    norm of the full gradient on every rank.
    """
    total: torch.Tensor | None = None
    sharded_groups = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if hasattr(g, "to_local") and hasattr(g, "device_mesh"):
            sharded_groups.append(g.device_mesh.get_group())
            g = g.to_local()
        if g.numel() == 0:
            continue
        sq = _sq_norm(g)
        total = sq if total is None else total + sq.to(total.device)
    if total is None:
        total = torch.zeros((), dtype=torch.float64)
    if sharded_groups:
        import torch.distributed as dist

        # One scalar per step; every DTensor of a model shares one mesh in practice.
        dist.all_reduce(total, group=sharded_groups[0])
    return total * (scale * scale)


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    # float32 accumulation for half-precision gradients; float64 gradients keep their precision
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(t, dtype=dtype).double() ** 2


def _num(x: float | torch.Tensor, name: str) -> torch.Tensor:
    t = x.detach().to(torch.float64) if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64)
    if t.dim() != 0:
        raise ValueError(f"{name} must be a scalar (a squared gradient norm), got shape {tuple(t.shape)}")
    return t


class GradientNoiseScale:
    """Smoothed two-batch-size estimate of B_simple = tr(Sigma)/|G|^2 (McCandlish et al., App. A).

    Args:
        ema: smoothing factor of the EMAs of tr(Sigma) and |G|^2 (0.95: about 20 steps of memory;
            B_noise grows as the loss falls, so a longer memory lags the truth).
    """

    def __init__(self, ema: float = 0.95):
        if not (0.0 <= ema < 1.0):
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        self.ema = float(ema)
        self._trace = torch.zeros((), dtype=torch.float64)  # EMA sums, bias-corrected on read
        self._grad_sq = torch.zeros((), dtype=torch.float64)
        self._weight = 0.0
        self.n_updates = 0
        self._small: tuple[torch.Tensor, int] | None = None
        self._big: tuple[torch.Tensor, int] | None = None
        self._ddp: dict[str, Any] | None = None
        self._accumulation: dict[str, Any] | None = None

    # ----------------------------------------------------------------- the estimator

    def update(self, small_sq_norm: float | torch.Tensor, big_sq_norm: float | torch.Tensor,
               small_batch: int, big_batch: int) -> None:
        """Fold one step's squared gradient norms, at batch sizes ``small_batch`` < ``big_batch``, in.

        Tensors stay on their device (no host sync here); reading :attr:`value` syncs.
        """
        if not (isinstance(small_batch, int) and isinstance(big_batch, int)) or small_batch < 1:
            raise ValueError(f"small_batch and big_batch must be positive ints, got {small_batch!r}, {big_batch!r}")
        if big_batch <= small_batch:
            raise ValueError(f"big_batch ({big_batch}) must be larger than small_batch ({small_batch})")
        small, big = _num(small_sq_norm, "small_sq_norm"), _num(big_sq_norm, "big_sq_norm")
        if self._trace.device != small.device:
            self._trace, self._grad_sq = self._trace.to(small.device), self._grad_sq.to(small.device)
        big = big.to(small.device)
        grad_sq = (big_batch * big - small_batch * small) / (big_batch - small_batch)
        trace = (small - big) / (1.0 / small_batch - 1.0 / big_batch)
        self._trace = self.ema * self._trace + (1 - self.ema) * trace
        self._grad_sq = self.ema * self._grad_sq + (1 - self.ema) * grad_sq
        self._weight = self.ema * self._weight + (1 - self.ema)
        self.n_updates += 1

    @property
    def trace_sigma(self) -> float | None:
        """Smoothed tr(Sigma): per-example gradient variance summed over parameters."""
        return float(self._trace) / self._weight if self.n_updates else None

    @property
    def grad_sq(self) -> float | None:
        """Smoothed |G|^2, the squared norm of the true gradient."""
        return float(self._grad_sq) / self._weight if self.n_updates else None

    @property
    def value(self) -> float | None:
        """B_noise in examples (``None`` before the first update, or while smoothed |G|^2 <= 0,
        i.e. the signal is not yet distinguishable from the noise)."""
        if not self.n_updates:
            return None
        g2, tr = float(self._grad_sq), float(self._trace)
        if g2 <= 0 or not math.isfinite(g2) or not math.isfinite(tr):
            return None
        return max(tr, 0.0) / g2

    def state_dict(self) -> dict[str, float | int]:
        return {"ema": self.ema, "trace_sum": float(self._trace), "grad_sq_sum": float(self._grad_sq),
                "weight": self._weight, "n_updates": self.n_updates}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        missing = {"ema", "trace_sum", "grad_sq_sum", "weight", "n_updates"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        self.ema = float(state["ema"])
        self._trace = torch.tensor(float(state["trace_sum"]), dtype=torch.float64, device=self._trace.device)
        self._grad_sq = torch.tensor(float(state["grad_sq_sum"]), dtype=torch.float64, device=self._trace.device)
        self._weight = float(state["weight"])
        self.n_updates = int(state["n_updates"])

    def __repr__(self) -> str:
        v = self.value
        return f"GradientNoiseScale(value={'None' if v is None else f'{v:.4g}'}, n_updates={self.n_updates})"

    # ----------------------------------------------------------------- gradient accumulation

    def measure_small(self, params: Iterable[torch.Tensor], batch_size: int, *, grad_scale: float = 1.0) -> None:
        """Record |G_small|^2 from the gradient after the first micro-batch of ``batch_size`` examples.

        ``grad_scale`` undoes the loss scaling of accumulation: pass the number of micro-batches if
        each micro-batch's loss was divided by it (the usual ``(loss / n).backward()``).
        """
        self._small = (grad_sq_norm(params, scale=grad_scale), int(batch_size))

    def measure_big(self, params: Iterable[torch.Tensor], batch_size: int) -> None:
        """Record |G_big|^2 from the accumulated gradient (mean over ``batch_size`` examples)."""
        self._big = (grad_sq_norm(params), int(batch_size))

    def attach_accumulation(self, params: Iterable[torch.Tensor], micro_batch_size: int, *,
                            grad_scale: float = 1.0) -> None:
        """Read every micro-batch's gradient norm with tensor hooks, for one process with accumulation.

        A hook sees each micro-batch's gradient before it is added to ``.grad``: its norm costs one
        reduction and no copy. At :meth:`step`, B_small = ``micro_batch_size`` with |G_small|^2 the
        mean over the step's micro-batches (less noisy than the first one alone), and B_big = their
        total with |G_big|^2 from the accumulated ``.grad``. ``grad_scale`` as in :meth:`measure_small`.
        A step with a single micro-batch has no pair and is skipped.
        """
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("attach_accumulation needs parameters that require grad")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size!r}")
        state: dict[str, Any] = {"sum": None, "count": 0, "batch": int(micro_batch_size),
                                 "scale2": float(grad_scale) ** 2, "params": params, "handles": []}

        def on_grad(grad: torch.Tensor) -> None:
            sq = _sq_norm(grad.to_local() if hasattr(grad, "to_local") else grad)
            state["sum"] = sq if state["sum"] is None else state["sum"] + sq.to(state["sum"].device)

        def count(grad: torch.Tensor) -> None:
            state["count"] += 1
            on_grad(grad)

        state["handles"] = [p.register_hook(count if i == 0 else on_grad) for i, p in enumerate(params)]
        self._accumulation = state

    def detach(self) -> None:
        """Remove the hooks of :meth:`attach_accumulation`."""
        state = self._accumulation
        if state is not None:
            for h in state["handles"]:
                h.remove()
            self._accumulation = None

    def step(self) -> float | None:
        """Fold in the norms recorded since the last call (by the ``measure_*`` methods or the DDP
        hook); a step without both is skipped. Returns :attr:`value` only if cheap to read (CPU)."""
        if self._ddp is not None and self._ddp["local"] is not None:
            self._fold_ddp()
        acc = self._accumulation
        if acc is not None and acc["count"]:
            n, total = acc["count"], acc["sum"]
            acc["sum"], acc["count"] = None, 0
            if n >= 2:
                self.update(total * acc["scale2"] / n, grad_sq_norm(acc["params"]), acc["batch"], acc["batch"] * n)
        if self._small is not None and self._big is not None:
            (small, b_small), (big, b_big) = self._small, self._big
            self.update(small, big, b_small, b_big)
        self._small = self._big = None
        return self.value if self._trace.device.type == "cpu" else None

    # ----------------------------------------------------------------- DDP

    def attach_ddp(self, model: Any, local_batch_size: int, *, process_group: Any = None) -> None:
        """Register a DDP communication hook that reads the local and the all-reduced gradient norms.

        It wraps the default all-reduce (average) hook, so training is unchanged. After each synced
        backward, :meth:`step` averages the ranks' local squared norms (one scalar all-reduce) and
        updates the estimate with B_small = ``local_batch_size`` and B_big = world size x that.
        """
        import torch.distributed as dist
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        group = process_group if process_group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        if world < 2:
            raise ValueError("attach_ddp needs at least 2 ranks: one process has no small/big pair "
                             "(use measure_small/measure_big with gradient accumulation)")
        state = {"local": None, "global": None, "group": group, "world": world, "batch": int(local_batch_size)}
        self._ddp = state

        # No annotations: DDP checks them against its own types, and this module's are strings.
        def hook(_state, bucket):  # type: ignore[no-untyped-def]
            buf = bucket.buffer()
            local = _sq_norm(buf)
            state["local"] = local if state["local"] is None else state["local"] + local
            fut = default_hooks.allreduce_hook(group, bucket)

            def after(f):  # type: ignore[no-untyped-def]
                reduced = f.value()[0] if isinstance(f.value(), list) else f.value()
                sq = _sq_norm(reduced)
                state["global"] = sq if state["global"] is None else state["global"] + sq
                return reduced

            return fut.then(after)

        model.register_comm_hook(None, hook)

    def _fold_ddp(self) -> None:
        import torch.distributed as dist

        state = self._ddp
        assert state is not None
        local, big = state["local"], state["global"]
        state["local"] = state["global"] = None
        if big is None:
            return
        local = local.clone()
        # The mean of the ranks' local norms: each is an unbiased estimate, the mean has less noise.
        dist.all_reduce(local, group=state["group"])
        self.update(local / state["world"], big, state["batch"], state["batch"] * state["world"])
