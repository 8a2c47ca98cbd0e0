"""The gradient noise scale B_noise = tr(Sigma) / |G|^2, measured almost for free (issue #11).

McCandlish, Kaplan, Amodei 2018 ("An Empirical Model of Large-Batch Training", Appendix A): the
squared norm of a mean gradient over B examples has expectation ``|G|^2 + tr(Sigma) / B``. Two
batch sizes B_small < B_big seen at the same step give unbiased estimates of both terms:

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

Each per-step estimate is very noisy (|G|^2 can even come out negative), and the ratio of two noisy
estimates is biased, so numerator and denominator are smoothed *separately* with an EMA and the
ratio is taken last. The smoothing's memory is counted in examples, not steps (``memory_examples``):
a run whose batch grows keeps the same memory in data, and the default, 100 steps of the first
measured batch, is the memory the critical-batch and fidelity benchmarks chose (20 steps read from
500 to 2300 and to NaN between seeds there). ``ema=`` keeps the older per-step memory.

Where the two norms come from, at the cost of one norm per step and no gradient copy:

* one process with gradient accumulation: ``|G_small|^2`` from each micro-batch's gradient, read
  by tensor hooks before it is accumulated, and ``|G_big|^2`` from the accumulated gradient
  (:meth:`GradientNoiseScale.attach_accumulation`; also the bare module under DDP, with
  ``process_group``: the accumulated gradient is then the all-reduced one); or, with no hooks, from the gradient after the
  first micro-batch (:meth:`GradientNoiseScale.measure_small`, :meth:`GradientNoiseScale.measure_big`);
* DDP: ``|G_small|^2`` from each rank's local gradient before the all-reduce and ``|G_big|^2`` from
  the all-reduced one, read by a communication hook (:meth:`GradientNoiseScale.attach_ddp`);

* FSDP2 or any setup where the caller already has the two squared norms: :meth:`GradientNoiseScale.update`.

What a loop does that these readings do not expect (a diagnostic backward pass, a zeroed gradient, a
loop without ``no_sync``, gradients no rank all-reduced) is read right, warned about and left out, or
raised, never read silently wrong (:mod:`._noise_hooks`).

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

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ._grad_norms import _local, adam_preconditioner, grad_sq_norm
from ._noise_hooks import AccumulationReader, DDPReader
from ._noise_probe import NoiseProbe, probe_noise_scale

__all__ = ["DEFAULT_MEMORY_STEPS", "GradientNoiseScale", "NoiseProbe", "adam_preconditioner", "grad_sq_norm",
           "probe_noise_scale"]

# The benchmarks' memory (critical_batch.py's pilot, scaling_fidelity.py's 4x run: EMA 0.99 per step), held
# in examples from the first measured step on.
DEFAULT_MEMORY_STEPS = 100


def _num(x: float | torch.Tensor, name: str) -> torch.Tensor:
    t = x.detach().to(torch.float64) if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64)
    if t.dim() != 0:
        raise ValueError(f"{name} must be a scalar (a squared gradient norm), got shape {tuple(t.shape)}")
    return t


class GradientNoiseScale:
    """Smoothed two-batch-size estimate of B_simple = tr(Sigma)/|G|^2 (McCandlish et al., App. A).

    Args:
        ema: a per-step smoothing factor of the EMAs of tr(Sigma) and |G|^2 (0.95: about 20 steps of
            memory), whatever the batch; not with ``memory_examples``.
        memory_examples: the smoothing's memory in examples (tokens, if the batch sizes are tokens): a step
            whose big batch is B keeps ``exp(-B / memory_examples)`` of the past. Default (neither
            given): ``DEFAULT_MEMORY_STEPS`` (100) times the first measured step's big batch, the memory
            the benchmarks chose; B_noise grows as the loss falls, so a much longer memory lags it.
        preconditioner: measure the preconditioned B_pre = tr(P Sigma) / (G^T P G) instead (module
            docstring): an Adam-style optimizer (``exp_avg_sq`` state; P from
            :func:`adam_preconditioner`), or a callable ``parameter -> weights`` (a tensor of the
            parameter's shape, P's diagonal, or None while unknown: the step is then not measured).
            Weights are read once per parameter per :meth:`step`, before the optimizer steps. Costs
            one elementwise product per gradient read. Not with :meth:`attach_ddp` (flat buckets);
            there, weigh the norms yourself and call :meth:`update`.
    """

    def __init__(self, ema: float | None = None, preconditioner: Any = None, *,
                 memory_examples: float | None = None):
        if ema is not None and memory_examples is not None:
            raise ValueError("give ema (a memory in steps) or memory_examples (in examples), not both")
        if ema is not None and not (0.0 <= ema < 1.0):
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        if memory_examples is not None and not (math.isfinite(memory_examples) and memory_examples > 0):
            raise ValueError(f"memory_examples must be a finite number > 0, got {memory_examples!r}")
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
        self.ema = None if ema is None else float(ema)
        self.memory_examples = None if memory_examples is None else float(memory_examples)
        self._trace = torch.zeros((), dtype=torch.float64)  # EMA sums, bias-corrected on read
        self._grad_sq = torch.zeros((), dtype=torch.float64)
        self._weight = 0.0
        self.n_updates = 0
        self.examples = 0  # the big batches folded in, summed: the data the estimate has seen
        self.batch_sizes: tuple[int, int] | None = None  # (B_small, B_big) of the last update
        self._small: tuple[torch.Tensor, int] | None = None
        self._big: tuple[torch.Tensor, int] | None = None
        self._ddp: DDPReader | None = None
        self._accumulation: AccumulationReader | None = None
        self._paused = False
        self._skipped = 0  # by readers since detached

    # ----------------------------------------------------------------- the estimator

    def _decay(self, big_batch: int) -> float:
        if self.ema is not None:
            return self.ema
        if self.memory_examples is None:
            self.memory_examples = float(DEFAULT_MEMORY_STEPS * big_batch)
        return math.exp(-big_batch / self.memory_examples)

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
        a = self._decay(big_batch)
        self._trace = a * self._trace + (1 - a) * trace
        self._grad_sq = a * self._grad_sq + (1 - a) * grad_sq
        self._weight = a * self._weight + (1 - a)
        self.n_updates += 1
        self.examples += big_batch
        self.batch_sizes = (small_batch, big_batch)

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

    def state_dict(self) -> dict[str, float | int | None]:
        return {"ema": self.ema, "memory_examples": self.memory_examples, "trace_sum": float(self._trace),
                "grad_sq_sum": float(self._grad_sq), "weight": self._weight, "n_updates": self.n_updates,
                "examples": self.examples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Also a state saved before the memory was counted in examples (its ``ema`` per step)."""
        missing = {"ema", "trace_sum", "grad_sq_sum", "weight", "n_updates"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        self.ema = None if state["ema"] is None else float(state["ema"])
        memory = state.get("memory_examples")
        self.memory_examples = None if memory is None else float(memory)
        self.examples = int(state.get("examples", 0))
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
                            grad_scale: float = 1.0, micro_batches: int | None = None,
                            process_group: Any = None) -> None:
        """Read every micro-batch's gradient norm with tensor hooks, for one process with accumulation.

        A hook sees each micro-batch's gradient before it is added to ``.grad``: its norm costs one
        reduction and no copy. At :meth:`step`, B_small = ``micro_batch_size`` with |G_small|^2 the
        mean over the step's micro-batches (less noisy than the first one alone), and B_big = their
        total with |G_big|^2 from the accumulated ``.grad``. ``grad_scale``: what each micro-batch's
        loss was divided by (as in :meth:`measure_small`; a step of fewer micro-batches is still read
        right). A step with a single micro-batch has no pair and is skipped.

        Only backward passes that reach ``.grad`` count: ``torch.autograd.grad`` does not, and a pass
        whose gradient was zeroed away (``.grad`` set to None) is dropped. ``micro_batches``: how many
        the step trains; a step with another count is warned about and not measured.
        ``process_group`` (several ranks): the bare module of a DDP model, whose accumulated ``.grad``
        is all-reduced: B_big = every rank's micro-batches, and a ``.grad`` that differs between ranks
        raises :class:`ValueError`.
        """
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("attach_accumulation needs parameters that require grad")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size!r}")
        if micro_batches is not None and (not isinstance(micro_batches, int) or micro_batches < 1):
            raise ValueError(f"micro_batches must be an int >= 1, got {micro_batches!r}")
        self.detach()
        self._accumulation = AccumulationReader(
            params, micro_batch_size, grad_scale, micro_batches, process_group,
            self._p_of if self._weights_of is not None else None, self._norm)

    def detach(self) -> None:
        """Remove the hooks of :meth:`attach_accumulation`."""
        if self._accumulation is not None:
            self._accumulation.remove()
            self._skipped += self._accumulation.skipped
            self._accumulation = None

    @property
    def skipped_steps(self) -> int:
        """Steps left out because they did not train what the plan says (warned about once)."""
        return self._skipped + (self._accumulation.skipped if self._accumulation is not None else 0)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Backward passes and steps inside the block are not measured (a branch probe's, an
        evaluation's): the hooks stay, they read nothing, and :meth:`step` folds nothing."""
        before = self._paused
        self._set_paused(True)
        try:
            yield
        finally:
            self._set_paused(before)

    def _set_paused(self, value: bool) -> None:
        self._paused = value
        for reader in (self._accumulation, self._ddp):
            if reader is not None:
                reader.paused = value
                if value and isinstance(reader, AccumulationReader):
                    reader.clear()

    def step(self) -> float | None:
        """Fold in the norms recorded since the last call (by the ``measure_*`` methods or the hooks);
        a step without both is skipped. Returns :attr:`value` only if cheap to read (CPU)."""
        if not self._paused:
            if self._ddp is not None:
                self._ddp.fold(self.update)
            if self._accumulation is not None:
                self._accumulation.fold(self.update)
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
        updates the estimate with B_small = ``local_batch_size`` and B_big = world size x that. A loop
        that all-reduces every micro-batch (no ``no_sync``) is read from its first all-reduce, with a
        warning (:mod:`._noise_hooks`).
        """
        import torch.distributed as dist

        if self._weights_of is not None:
            raise ValueError("preconditioner is not supported by attach_ddp (its buckets are flat): compute the "
                             "P-weighted squared norms and call update()")
        group = process_group if process_group is not None else dist.group.WORLD
        if dist.get_world_size(group) < 2:
            raise ValueError("attach_ddp needs at least 2 ranks: one process has no small/big pair "
                             "(use measure_small/measure_big with gradient accumulation)")
        self._ddp = DDPReader(model, local_batch_size, group)
