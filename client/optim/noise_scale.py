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

With ``preconditioner=`` (an Adam-style optimizer, or per-parameter weights) every squared norm is
P-weighted, ``|g|_P^2 = sum_i P_i g_i^2``, whose expectation is ``G^T P G + tr(P Sigma) / B``: the
same two-batch estimator then gives the preconditioned noise scale B_pre = tr(P Sigma) / (G^T P G).
For an update ``-lr P g`` the optimal-step analysis (McCandlish sec. 2.2) gives
tr(PHP Sigma) / (G^T PHP G); it is B_pre where PH ~ I, and B_simple where PHP ~ I (Adam's
P ~ diag(H)^(-1/2) when its second moment tracks a Fisher ~ H). Which one predicts the critical batch
is an empirical question: ``benchmarks/critical_batch.py`` reports both (README, "Critical batch").

Per step, a training loop (or ``Job``) calls :meth:`GradientNoiseScale.step` (after measuring) or
:meth:`GradientNoiseScale.update` (with numbers) and reads :attr:`GradientNoiseScale.value`.

The streaming estimate smooths |G|^2 over steps, so it reads a ratio of means along the trajectory:
where |G(theta_t)|^2 swings from one step to the next (Adam oscillating near its noise floor), that is
near the harmonic mean of the local values, well below their mean. :func:`probe_noise_scale` measures
B_simple at the current parameters alone, from as many micro-batches as it is given (not free: one
backward pass each), so a caller can average the local values instead (README, "Critical batch").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

__all__ = ["GradientNoiseScale", "NoiseProbe", "adam_preconditioner", "grad_sq_norm", "probe_noise_scale"]


def grad_sq_norm(params: Iterable[torch.Tensor], *, scale: float = 1.0,
                 weights: Callable[[torch.Tensor], torch.Tensor | None] | None = None) -> torch.Tensor | None:
    """``scale^2 * sum |p.grad|^2`` over ``params`` as a 0-dim float64 tensor, without a gradient copy.

    With ``weights`` (parameter -> tensor of its shape, or None when not available), the P-weighted
    ``scale^2 * sum_i P_i grad_i^2``; None if a parameter with a gradient has no weights.
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
        if weights is None:
            sq = _sq_norm(g)
        else:
            w = weights(p)
            if w is None:
                return None
            sq = _weighted_sq_norm(g, _local(w))
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


def _weighted_sq_norm(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum w * g^2`` (float32 accumulation for half precision, as :func:`_sq_norm`)."""
    dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    return (g.to(dtype).square() * w.to(dtype)).sum().double()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "device_mesh") else t


def adam_preconditioner(optimizer: Any) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """Per-parameter weights ``P = 1 / (sqrt(v_hat) + eps)`` from an Adam-style optimizer's state.

    ``v_hat`` is the bias-corrected ``exp_avg_sq`` (``state["step"]``, the group's ``betas`` and
    ``eps``), read before the optimizer steps: P then does not depend on the gradients it weighs.
    Coordinates whose ``exp_avg_sq`` is still 0 (never had a gradient, e.g. the embedding row of a
    token not yet seen) get weight 0, not ``1/eps``: Adam has no scale for them yet, and one
    first gradient weighted by 1e8 would swamp the estimate. Returns None for a parameter with no
    state yet (before the first step): that step is not measured.
    """
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list) or not hasattr(optimizer, "state"):
        raise ValueError(f"preconditioner must be an optimizer with param_groups and state, got {optimizer!r}")
    for i, group in enumerate(groups):
        if "betas" not in group or "eps" not in group:
            raise ValueError(f"preconditioner: param group {i} of {type(optimizer).__name__} has no 'betas'/'eps' "
                             "(an Adam-style optimizer is needed; pass a callable for other preconditioners)")

    group_of: dict[int, dict] = {}

    def weights(p: torch.Tensor) -> torch.Tensor | None:
        if id(p) not in group_of:  # (re)built when a parameter is new to it: param groups can be added
            group_of.clear()
            group_of.update({id(q): g for g in optimizer.param_groups for q in g["params"]})
        group = group_of.get(id(p))
        state = optimizer.state.get(p)
        if group is None or not state or "exp_avg_sq" not in state or "step" not in state:
            return None
        v, step = _local(state["exp_avg_sq"]), state["step"]
        # a tensor step (capturable/fused Adam) stays on the device: no host sync per parameter
        step = step.to(v.device, torch.float32) if isinstance(step, torch.Tensor) else float(step)
        v_hat = v.float() / (1.0 - group["betas"][1] ** step)
        return torch.where(v > 0, 1.0 / (v_hat.sqrt() + group["eps"]), torch.zeros_like(v_hat))

    return weights


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
        preconditioner: measure the preconditioned B_pre = tr(P Sigma) / (G^T P G) instead (module
            docstring): an Adam-style optimizer (``exp_avg_sq`` state; P from
            :func:`adam_preconditioner`), or a callable ``parameter -> weights`` (a tensor of the
            parameter's shape, P's diagonal, or None while unknown: the step is then not measured).
            Weights are read once per parameter per :meth:`step`, before the optimizer steps. Costs
            one elementwise product per gradient read. Not with :meth:`attach_ddp` (flat buckets);
            there, weigh the norms yourself and call :meth:`update`.
    """

    def __init__(self, ema: float = 0.95, preconditioner: Any = None):
        if not (0.0 <= ema < 1.0):
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        if preconditioner is None or isinstance(preconditioner, torch.optim.Optimizer) or hasattr(
                preconditioner, "param_groups"):
            self._weights_of = None if preconditioner is None else adam_preconditioner(preconditioner)
            self._check_weights = False
        elif callable(preconditioner):
            self._weights_of = preconditioner
            self._check_weights = True  # a caller's weights: checked once per parameter per step (a sync)
        else:
            raise TypeError("preconditioner must be None, an Adam-style optimizer or a callable parameter -> "
                            f"weights, got {type(preconditioner).__name__}")
        self._weights: dict[int, torch.Tensor | None] = {}  # this step's P per parameter (cleared by step)
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

    @property
    def estimate(self) -> torch.Tensor | None:
        """:attr:`value` as a 0-d float64 tensor where the norms are (no host sync: what a job
        reports each step); not yet meaningful (negative, inf, NaN) until |G|^2 is resolved, which
        :attr:`value` reports as None. ``None`` before the first update."""
        if not self.n_updates:
            return None
        return self._trace.clamp(min=0.0) / self._grad_sq

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

    @property
    def preconditioned(self) -> bool:
        """Whether the norms are P-weighted (B_pre) rather than plain (B_simple)."""
        return self._weights_of is not None

    def _p_of(self, p: torch.Tensor) -> torch.Tensor | None:
        if id(p) not in self._weights:
            w = self._weights_of(p)  # type: ignore[misc]
            if w is not None:
                w = _local(w.detach() if isinstance(w, torch.Tensor) else torch.as_tensor(w))
                if self._check_weights and not bool((w >= 0).all()):
                    raise ValueError("preconditioner returned negative weights: P must be positive semi-definite")
            self._weights[id(p)] = w
        return self._weights[id(p)]

    def _norm(self, params: Iterable[torch.Tensor], scale: float = 1.0) -> torch.Tensor | None:
        return grad_sq_norm(params, scale=scale, weights=self._p_of if self._weights_of is not None else None)

    def __repr__(self) -> str:
        v = self.value
        return f"GradientNoiseScale(value={'None' if v is None else f'{v:.4g}'}, n_updates={self.n_updates})"

    # ----------------------------------------------------------------- gradient accumulation

    def measure_small(self, params: Iterable[torch.Tensor], batch_size: int, *, grad_scale: float = 1.0) -> None:
        """Record |G_small|^2 from the gradient after the first micro-batch of ``batch_size`` examples.

        ``grad_scale`` undoes the loss scaling of accumulation: pass the number of micro-batches if
        each micro-batch's loss was divided by it (the usual ``(loss / n).backward()``).
        """
        small = self._norm(params, grad_scale)
        self._small = None if small is None else (small, int(batch_size))

    def measure_big(self, params: Iterable[torch.Tensor], batch_size: int) -> None:
        """Record |G_big|^2 from the accumulated gradient (mean over ``batch_size`` examples)."""
        big = self._norm(params)
        self._big = None if big is None else (big, int(batch_size))

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
        state: dict[str, Any] = {"sum": None, "count": 0, "batch": int(micro_batch_size), "missing": False,
                                 "scale2": float(grad_scale) ** 2, "params": params, "handles": []}

        def on_grad(p: torch.Tensor, grad: torch.Tensor, first: bool) -> None:
            if first:
                state["count"] += 1
            g = _local(grad)
            if self._weights_of is None:
                sq = _sq_norm(g)
            else:
                w = self._p_of(p)
                if w is None:
                    state["missing"] = True
                    return
                sq = _weighted_sq_norm(g, w)
            state["sum"] = sq if state["sum"] is None else state["sum"] + sq.to(state["sum"].device)

        state["handles"] = [p.register_hook(lambda g, p=p, first=(i == 0): on_grad(p, g, first))
                            for i, p in enumerate(params)]
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
            n, total, missing = acc["count"], acc["sum"], acc["missing"]
            acc["sum"], acc["count"], acc["missing"] = None, 0, False
            big = self._norm(acc["params"]) if n >= 2 and not missing and total is not None else None
            if big is not None:
                self.update(total * acc["scale2"] / n, big, acc["batch"], acc["batch"] * n)
        if self._small is not None and self._big is not None:
            (small, b_small), (big, b_big) = self._small, self._big
            self.update(small, big, b_small, b_big)
        self._small = self._big = None
        self._weights.clear()  # the optimizer steps next: P is read afresh for the next gradients
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

        if self._weights_of is not None:
            raise ValueError("preconditioner is not supported by attach_ddp (its buckets are flat): compute the "
                             "P-weighted squared norms and call update()")
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


# --------------------------------------------------------------------- at fixed parameters


class NoiseProbe(NamedTuple):
    """B_simple at one point: ``value`` = ``trace_sigma / grad_sq`` (None while |G|^2 <= 0, the
    signal not resolved by ``batches`` x ``batch_size`` examples)."""

    value: float | None
    trace_sigma: float
    grad_sq: float
    batches: int
    batch_size: int


class _LossOf(torch.nn.Module):
    """``loss_fn(model, batch)`` as a module, so :func:`torch.func.functional_call` can swap its parameters."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def probe_noise_scale(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
                      batches: Iterable[Any], batch_size: int) -> NoiseProbe:
    """B_simple = tr(Sigma) / |G|^2 at ``model``'s current parameters, from independent micro-batches.

    ``loss_fn(model, batch)`` returns the mean loss over one micro-batch of ``batch_size`` examples;
    ``batches`` yields k >= 2 of them, drawn independently. From their gradients g_1..g_k, the
    unbiased U-statistics |G|^2 ~ sum_{i != j} g_i.g_j / (k (k - 1)) and
    tr(Sigma) ~ batch_size (mean |g_i|^2 - |G|^2). |G|^2 is resolved once k x batch_size is well above
    B_noise. The gradients are taken with respect to detached aliases of the parameters (no copy):
    ``.grad`` is left as it is and tensor hooks (:meth:`GradientNoiseScale.attach_accumulation`)
    do not see them. Keeps one float64 running sum of the gradients (2x the parameters' fp32 memory).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    wrapper = _LossOf(model, loss_fn)
    aliases = {n: p.detach().requires_grad_() for n, p in wrapper.named_parameters() if p.requires_grad}
    if not aliases:
        raise ValueError("probe_noise_scale: the model has no parameters that require grad")
    params = list(aliases.values())
    total: list[torch.Tensor] | None = None
    diag: torch.Tensor | None = None  # on the gradients' device: no host sync per micro-batch
    k = 0
    for batch in batches:
        loss = torch.func.functional_call(wrapper, aliases, (batch,), strict=False)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar tensor (the mean loss over the batch), got {loss!r}")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        sq = sum(_sq_norm(g).to(grads[0].device) for g in grads)
        diag = sq if diag is None else diag + sq
        if total is None:
            total = [g.detach().to(torch.float64) for g in grads]
        else:
            for t, g in zip(total, grads, strict=True):
                t.add_(g.to(torch.float64))
        k += 1
    if k < 2 or total is None or diag is None:
        raise ValueError(f"probe_noise_scale needs at least 2 micro-batches, got {k}")
    sum_sq = sum(float(t.square().sum()) for t in total)
    grad_sq = (sum_sq - float(diag)) / (k * (k - 1))
    trace = batch_size * (float(diag) / k - grad_sq)
    value = max(trace, 0.0) / grad_sq if grad_sq > 0 and math.isfinite(grad_sq) else None
    return NoiseProbe(value, trace, grad_sq, k, batch_size)
