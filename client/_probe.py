"""The critical batch measured by branching (Merrill et al. 2025, "Critical batch size revisited"): from
the job's current state, short branches at k x B (k = 1, 2, 4, ...) each train the same examples in the
same order (branch k groups k steps' micro-batches into one step), with the LR moved by the engine's
regime rule for the recipe's optimizer and Adam's moments keeping the run's memory in examples (betas
beta -> beta^k); the loss each reaches on the same held-out micro-batches says how much a bigger batch
loses per example.

Why the betas move: a branch starts from moments the run averaged at B. Kept at beta per step, the k x B
branch forgets them over k times the examples, and its whole window (8 steps at the largest k, by
default) runs on B's noisy momentum at several times B's LR: on a teacher MLP the largest branches' loss
rose over their window and B_crit read 10-30x below steps-to-target's. At beta^k every branch forgets
the inherited moments over the same examples, which is Malladi et al. 2022's SDE rule, 1 - beta -> k(1 -
beta), to first order, and stays in [0, 1) at any k. The model, optimizer, scheduler and RNG state are put back
bit for bit afterwards, so training goes on as if no probe had run.

How the losses read as B_crit, at equal loss and with an interval that counts the data order, is
:mod:`._branch_reading`.

The measurement is study evidence: the job sends it (``POST /v1/runs/{id}/critical-batches``, rank 0, once
the run is open) with the examples seen at its step and the job's streaming B_noise there, and the study's
``GET .../critical-batch`` calibrates the streaming statistic by it.

A mixin of :class:`~largebatch.client.Job`; torch is imported only when a probe runs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from largebatch.scaling_rules.wire import MeasuredCriticalBatch, MeasuredCriticalBatchIn

from . import _dist, errors
from ._branch_reading import curve_steps, fit_critical_batch
from ._reporter import seen

__all__ = ["BranchProbe", "BranchProbing", "fit_critical_batch"]

log = logging.getLogger("largebatch.client")



@dataclass(frozen=True)
class BranchProbe:
    """What :meth:`BranchProbing.branch_probe` measured at one checkpoint (losses on the same held-out
    micro-batches; B in examples, the global batch)."""

    step: int | None  # the job's last reported step when the probe ran (where along the run it measured)
    batch_size: int  # B: the k = 1 branch's examples per optimizer step, over all ranks
    window_examples: int  # what every branch trained on
    loss_before: float
    losses: dict[int, float]  # k -> loss after the window
    gains: dict[int, float]  # k -> loss_before - loss
    gain_se: dict[int, float]  # k -> standard error of the gain over the evaluation micro-batches
    lr_factors: dict[int, float]  # k -> the LR factor the regime rule gave branch k
    critical_batch: float | None  # B_crit (examples), None where the losses do not identify it
    interval: tuple[float, float] | None  # 5%..95% of B_crit over the evaluation and data-order noise
    note: str
    cost_examples: int  # training examples over all branches (plus the evaluations' forward passes)
    cost_steps: int
    examples_seen: float | None = None  # examples trained on up to ``step`` (None: no step reported yet)
    tokens_seen: float | None = None
    noise_scale: float | None = None  # the job's streaming B_noise when the probe ran, if it measures one
    stored: MeasuredCriticalBatch | None = None  # what the service stored (None: not sent, the log says why)
    curve: dict[int, float] = dataclasses.field(default_factory=dict)  # the smallest-k branch: its steps -> loss
    examples_ratios: dict[int, float] = dataclasses.field(default_factory=dict)  # k -> E(kB)/E(kmin B) read
    # k -> the betas branch k ran with (its first param group's; empty: the optimizer has none)
    betas: dict[int, tuple[float, ...]] = dataclasses.field(default_factory=dict)


class _Snapshot:
    """Everything a branch changes, copied, and put back bit for bit (tensors in place: whatever holds
    them, a DDP reducer or a fused optimizer, keeps holding the same tensors)."""

    def __init__(self, module: Any, optimizer: Any, scheduler: Any):
        import torch

        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.tensors = [(t, t.detach().clone()) for t in [*module.parameters(), *module.buffers()]]
        self.grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in module.parameters()]
        self.training = [(m, m.training) for m in module.modules()]
        self.state = {p: {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                          for k, v in s.items()} for p, s in optimizer.state.items()}
        self.groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        self.attrs = {k: v for k, v in vars(optimizer).items() if isinstance(v, (bool, int, float))}
        self.sched = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None
        self.rng = _rng_state()

    def restore(self, *, grads: bool = True) -> None:
        import torch

        with torch.no_grad():
            for t, saved in self.tensors:
                t.copy_(saved)
            if grads:
                for p, g in self.grads:
                    if g is None:
                        p.grad = None
                    elif p.grad is not None and p.grad.shape == g.shape:
                        p.grad.copy_(g)
                    else:
                        p.grad = g.clone()
            for p in list(self.optimizer.state):
                if p not in self.state:
                    del self.optimizer.state[p]
            for p, saved in self.state.items():
                live = self.optimizer.state[p]
                for k in list(live):
                    if k not in saved:
                        del live[k]
                for k, v in saved.items():
                    if isinstance(v, torch.Tensor) and isinstance(live.get(k), torch.Tensor) and live[k].shape == v.shape:
                        live[k].copy_(v)
                    else:
                        live[k] = v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
        for g, saved in zip(self.optimizer.param_groups, self.groups, strict=True):
            g.update(copy.deepcopy(saved))
        for k, v in self.attrs.items():
            setattr(self.optimizer, k, v)
        if self.sched is not None:
            self.scheduler.load_state_dict(copy.deepcopy(self.sched))
        self.train_modes()
        _set_rng_state(self.rng)

    def train_modes(self) -> None:
        """Each module's train/eval mode as it was (an evaluation inside a branch switches them)."""
        for m, mode in self.training:
            m.training = mode


def _rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if "numpy" in sys.modules:
        state["numpy"] = sys.modules["numpy"].random.get_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        sys.modules["numpy"].random.set_state(state["numpy"])


@contextlib.contextmanager
def _quiet_steps(optimizer: Any, noise: Any) -> Iterator[None]:
    """A branch's steps are not training steps: the job's step hooks (its checks, the noise fold) and
    the noise estimator's gradient hooks do not see them."""
    saved = {}
    for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
        if isinstance(getattr(optimizer, name, None), dict):
            saved[name] = getattr(optimizer, name)
            setattr(optimizer, name, type(saved[name])())
    try:
        with noise.paused() if noise is not None else contextlib.nullcontext():
            yield
    finally:
        for name, hooks in saved.items():
            setattr(optimizer, name, hooks)


class BranchProbing:
    """:meth:`branch_probe` (mixed into :class:`~largebatch.client.Job`)."""

    optimizer: Any
    scheduler: Any
    noise: Any
    world_size: int
    follower: bool
    run: Any
    complete_timeout: float

    if TYPE_CHECKING:
        from largebatch.scaling_rules.models import Recipe

        recipe: Recipe

    def branch_probe(self, model: Any, batches: Callable[[], Iterable[Any]],
                     loss_fn: Callable[[Any, Any], Any], *, ks: Sequence[int] = (1, 2, 4, 8),
                     steps: int | None = None, micro_batches: int = 1, batch_size: int | None = None,
                     eval_micro_batches: int | None = None, moment_memory: str = "examples",
                     send: bool = True) -> BranchProbe:
        """Measure the critical batch here by branching (module docstring); training state is restored.

        Args:
            model: what the training loop trains (under DDP the ``DistributedDataParallel`` wrapper:
                the branches sync with ``no_sync`` around all but the last micro-batch of a step).
            batches: called once per branch (and once for the starting loss), returns this rank's
                micro-batches in the same order each time (e.g. a seeded sampler from this point on).
            loss_fn: ``loss_fn(model, batch)``, the mean loss over one micro-batch.
            ks: the batch multiples; branch k trains ``steps / k`` steps of k x B.
            steps: the window in k = 1 steps (default ``8 x max(ks)``); a multiple of every k.
            micro_batches: micro-batches per rank in one k = 1 step.
            batch_size: B, the global examples per k = 1 step (default: the recipe's batch).
            eval_micro_batches: the held-out micro-batches per rank every loss is read on: those that
                follow the window in ``batches()`` (default ``8 x micro_batches``).
            moment_memory: ``"examples"`` (default): branch k runs with betas ``beta^k``, so the moments it
                inherits fade over the same examples in every branch (module docstring); ``"steps"``: the
                run's betas in every branch. Optimizers without ``betas`` (SGD's momentum is a sum whose
                scale the LR rule already counts) are left as they are either way.
            send: send a measured B_crit to the service as study evidence (rank 0; ``stored`` is the answer).
        """
        ks = tuple(ks)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks) or len(set(ks)) != len(ks):
            raise ValueError(f"ks must be distinct ints >= 1, got {ks!r}")
        if len(ks) < 2:
            raise ValueError(f"ks needs at least two batch multiples to compare, got {ks!r}")
        steps = 8 * max(ks) if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or any(steps % k for k in ks):
            raise ValueError(f"steps must be a positive multiple of every k in {ks}, got {steps!r}")
        for name, v in (("micro_batches", micro_batches), ("eval_micro_batches", eval_micro_batches),
                        ("batch_size", batch_size)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if moment_memory not in ("examples", "steps"):
            raise ValueError(f'moment_memory must be "examples" or "steps", got {moment_memory!r}')
        if not callable(batches):
            raise TypeError("batches must be a callable that returns the micro-batches, the same each call")
        if self.optimizer is None:
            raise ValueError("branch_probe needs the job's optimizer")
        n_eval = 8 * micro_batches if eval_micro_batches is None else eval_micro_batches
        if batch_size is None:
            sizes = sorted({s.batch_size for s in self.recipe.stages})
            if len(sizes) > 1:
                raise ValueError(f"the recipe has stages at batch sizes {sizes}: pass batch_size (this stage's)")
            batch_size = sizes[0]
        _, world = _dist.world()
        factors = {k: _lr_factor(self.recipe.optimizer.name, k * batch_size, batch_size, self.noise) for k in ks}
        run_betas = [g.get("betas") for g in self.optimizer.param_groups]
        betas = {k: [None if b is None else _branch_betas(b, k if moment_memory == "examples" else 1)
                     for b in run_betas] for k in ks}
        window = steps * batch_size
        cost_steps = sum(steps // k for k in ks)
        kmin, points = min(ks), curve_steps(steps, ks)
        log.info("largebatch: branch probe: %d branches (k = %s) of %d examples each at B = %d: %d training examples "
                 "in %d optimizer steps, plus %d evaluation micro-batches per rank x %d (the k = %d branch read at %d "
                 "points); the state is restored after", len(ks), ", ".join(map(str, ks)), window, batch_size,
                 window * len(ks), cost_steps, n_eval, len(ks) + len(points), kmin, len(points))
        module = getattr(model, "module", model)
        snap = _Snapshot(module, self.optimizer, self.scheduler)
        per_k: dict[int, list[float]] = {}
        curve: dict[int, list[float]] = {}
        try:
            with _quiet_steps(self.optimizer, self.noise):
                held = _held_out(_skip(batches(), steps * micro_batches), n_eval)
                base = _evaluate(module, loss_fn, held)
                for k in ks:
                    snap.restore(grads=False)
                    for p in module.parameters():
                        p.grad = None
                    for g, saved, b in zip(self.optimizer.param_groups, snap.groups, betas[k], strict=True):
                        g["lr"] = saved["lr"] * factors[k]
                        if b is not None:
                            g["betas"] = b
                    it = iter(batches())
                    done = 0
                    for n in points if k == kmin else [steps // k]:
                        snap.train_modes()
                        _train(model, self.optimizer, loss_fn, it, n - done, k * micro_batches)
                        per_k[k] = _evaluate(module, loss_fn, held)
                        if k == kmin:
                            curve[n] = per_k[k]
                        done = n
        finally:
            snap.restore()
        result = _summarise(batch_size, steps, window * len(ks), cost_steps, base, per_k, curve, factors, world)
        if run_betas and run_betas[0] is not None:
            result = dataclasses.replace(result, betas={k: betas[k][0] for k in ks})
        step = getattr(self, "last_step", None)
        examples, tokens = seen(self.recipe.stages, step) if step is not None else (None, None)
        noise = getattr(self.noise, "value", None) if self.noise is not None else None
        result = dataclasses.replace(result, step=step, examples_seen=examples, tokens_seen=tokens,
                                     noise_scale=noise if noise is not None and math.isfinite(noise) and noise > 0
                                     else None)
        return dataclasses.replace(result, stored=self._send_probe(result)) if send else result

    def _send_probe(self, probe: BranchProbe) -> MeasuredCriticalBatch | None:
        """The measurement sent as study evidence, retried on transient errors for up to ``complete_timeout``;
        None (logged) when there is nothing to send or the service refused it: the probe's result stands."""
        why = None
        if probe.critical_batch is None or probe.interval is None:
            why = "the losses did not identify B_crit"
        elif getattr(self, "follower", False):
            return None  # rank 0 sends
        elif self.run is None:
            why = "the run is not open (the service was unreachable)"
        elif probe.step is None or not probe.examples_seen:
            why = "no step was reported before it: where along the run it measured is unknown"
        if why is not None:
            log.info("largebatch: branch probe not sent as study evidence: %s", why)
            return None
        assert probe.critical_batch is not None and probe.interval is not None and probe.step is not None
        lo, hi = probe.interval
        try:
            body = MeasuredCriticalBatchIn(
                step=probe.step, examples_seen=probe.examples_seen, tokens_seen=probe.tokens_seen,
                # the interval comes from redrawn gains and may miss the estimate at an edge: stretched to hold it
                critical_batch=probe.critical_batch, critical_batch_low=min(lo, probe.critical_batch),
                critical_batch_high=None if not math.isfinite(hi) else max(hi, probe.critical_batch),
                noise_scale=probe.noise_scale, batch_size=probe.batch_size, ks=sorted(probe.losses),
                window_examples=probe.window_examples)
            run_id = self.run.id
            return self._retrying(lambda c: c.report_critical_batch(run_id, body),  # type: ignore[attr-defined]
                                  deadline=time.monotonic() + self.complete_timeout)
        except (errors.APIError, ValidationError) as e:
            log.warning("largebatch: the branch probe's critical batch was not recorded: %s", e)
            return None


def _lr_factor(optimizer: str, batch: float, ref: float, noise: Any) -> float:
    from largebatch.scaling_rules._lr import regime_factor
    from largebatch.scaling_rules._plan import _default_rule

    value = getattr(noise, "value", None) if noise is not None else None
    return regime_factor(batch, ref, value, _default_rule(optimizer))


def _branch_betas(betas: Sequence[float], k: int) -> tuple[float, ...]:
    """The betas that keep an EMA's memory in examples when its steps grow k-fold: beta^k per step."""
    return tuple(float(b) ** k for b in betas)


def _skip(it: Iterable[Any], n: int) -> Iterator[Any]:
    it = iter(it)
    for _ in range(n):
        if next(it, _END) is _END:
            raise ValueError(f"batches() ran out within the window ({n} micro-batches): give a longer stream")
    return it


_END = object()


def _take(it: Iterator[Any]) -> Any:
    batch = next(it, _END)
    if batch is _END:
        raise ValueError("batches() ran out: it must yield the window's and the evaluation's micro-batches")
    return batch


def _train(model: Any, optimizer: Any, loss_fn: Callable[[Any, Any], Any], it: Iterator[Any], steps: int,
           per_step: int) -> None:
    sync = getattr(model, "no_sync", None)
    for _ in range(steps):
        for j in range(per_step):
            batch = _take(it)
            with sync() if sync is not None and j < per_step - 1 else contextlib.nullcontext():
                (loss_fn(model, batch) / per_step).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _held_out(it: Iterator[Any], n: int) -> list[Any]:
    return [_take(it) for _ in range(n)]


def _evaluate(module: Any, loss_fn: Callable[[Any, Any], Any], held: list[Any]) -> list[float]:
    import torch

    module.eval()
    with torch.no_grad():
        return [float(loss_fn(module, batch)) for batch in held]


def _summarise(batch: int, steps: int, cost_examples: int, cost_steps: int, base: list[float],
               per_k: dict[int, list[float]], curve: dict[int, list[float]], factors: dict[int, float],
               world: int) -> BranchProbe:
    ks, points = sorted(per_k), sorted(curve)
    # Per rank: sums over the evaluation micro-batches of the loss before and of each paired difference.
    local = [sum(base), float(len(base))]
    for losses in [*(per_k[k] for k in ks), *(curve[n] for n in points)]:
        d = [b - a for b, a in zip(base, losses, strict=True)]
        local += [sum(losses), sum(d), sum(x * x for x in d)]
    totals = _dist.total(local) if world > 1 else local
    n = totals[1]
    read = []  # (mean loss, gain, its standard error) per branch, then per curve point
    for i in range(len(ks) + len(points)):
        s_loss, s_d, s_d2 = totals[2 + 3 * i: 5 + 3 * i]
        gain = s_d / n
        var = max(s_d2 / n - gain ** 2, 0.0) * n / max(n - 1, 1)
        read.append((s_loss / n, gain, math.sqrt(var / n) if math.isfinite(var) else math.nan))
    losses = {k: read[i][0] for i, k in enumerate(ks)}
    gains = {k: read[i][1] for i, k in enumerate(ks)}
    ses = {k: read[i][2] for i, k in enumerate(ks)}
    line = [(p, *read[len(ks) + j][1:]) for j, p in enumerate(points)]
    bc, interval, note, ratios = fit_critical_batch(batch, ks, steps, line, [gains[k] for k in ks],
                                                    [ses[k] for k in ks])
    before = totals[0] / n
    rose = [k for k in ks[1:] if gains[k] < -2 * ses[k]]
    if rose:
        # A branch that ends above where it started did not trade steps for examples: its LR (or the
        # moments it inherited) overshot at that batch, and the reading counts that as the batch's cost.
        whose = "branches'" if len(rose) > 1 else "branch's"
        note += (f"; the k = {', '.join(map(str, rose))} {whose} loss rose over the "
                 f"window (at x{', x'.join(f'{factors[k]:.3g}' for k in rose)} the LR): the LR rule overshoots "
                 "there, and the reading counts that as the bigger batch's cost")
    if before > 0 and gains[ks[0]] > 0.5 * before:
        # Most of the loss gone in the window: every branch ends near the floor whatever its batch, and
        # the loss no longer tells the examples apart.
        note += (f"; the window gained {gains[ks[0]] / before:.0%} of the loss, near its floor: a shorter window "
                 "(steps=) reads the local critical batch")
    return BranchProbe(step=None, batch_size=batch, window_examples=steps * batch, loss_before=before, losses=losses,
                       gains=gains, gain_se=ses, lr_factors=dict(factors), critical_batch=bc, interval=interval,
                       note=note, cost_examples=cost_examples, cost_steps=cost_steps,
                       curve={p: read[len(ks) + j][0] for j, p in enumerate(points)}, examples_ratios=ratios)
