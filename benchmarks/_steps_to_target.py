"""Steps to a target loss as Shallue et al. 2019 measure them, for ``critical_batch.py``.

The pieces: a training run to a target loss read from exponentially averaged weights (the crossing
step interpolated between evaluation points), the LR tuned per batch on a sqrt(2)-spaced grid against
the mean of tuning seeds, fresh seeds at the chosen LR, the fit of McCandlish et al.'s hyperbola
S = S_min (1 + B_crit / B) with its own residual, and bootstrap intervals over the fresh seeds. The pure
helpers (``crossing``, ``ema_decay``, ``fit_hyperbola``, ``fit_rms``, ``bootstrap_b_crit``) need no torch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from largebatch.scaling_rules.stats import bootstrap_interval

WARMUP_STEPS = 5  # Adam needs a few steps to settle its second moments; short next to every S here
# The weight average spans the last ~EMA_SHARE of the steps taken so far, at every step: its lag is a
# fixed share of the step count, so it stretches every batch's S by the same factor and leaves
# B_crit = E_min / S_min as it is (a fixed-length average would lag the 30-step runs far more than
# the 3000-step ones).
EMA_SHARE = 0.1
# Evaluation points 10% apart: the crossing is interpolated between them, and an evaluation of the
# MLP's 10,000 validation examples costs more than ten training steps at small batch.
EVAL_SPACING = 1.1
DIVERGENCE_FACTOR = 3.0  # a loss 3x above the first one (or NaN) ends the run, as in scaling_fidelity.py
FIT_RMS_LIMIT = 0.15  # above this RMS relative error, the hyperbola does not describe the task


def ema_decay(step: int, share: float = EMA_SHARE) -> float:
    """The averaging weight kept at ``step`` (1-based): a memory of about ``share * step`` steps."""
    return 1.0 - 1.0 / (1.0 + share * step)


def eval_steps(cap: int, spacing: float = EVAL_SPACING) -> list[int]:
    out, s = [], 1.0
    while s < cap:
        out.append(round(s))
        s = max(s * spacing, s + 1)
    return sorted({*out, cap})


def crossing(trace: Sequence[tuple[int, float]], target: float) -> float | None:
    """The step at which the loss first reaches ``target``, interpolated linearly in log(step) between
    the last evaluation above it and the first at or below it (None if it never does)."""
    prev = None
    for step, loss in trace:
        if loss <= target:
            if prev is None or prev[1] <= loss:
                return float(step)
            frac = (prev[1] - target) / (prev[1] - loss)
            return math.exp(math.log(prev[0]) + frac * (math.log(step) - math.log(prev[0])))
        prev = (step, loss)
    return None


def fit_hyperbola(batches: Sequence[float], steps: Sequence[float]) -> tuple[float, float]:
    """S = S_min + E_min / B (McCandlish et al. 2018 eq. 2.11), least squares in relative error:
    (S_min, E_min). Closed form, so the bootstrap can refit thousands of times."""
    a = [1.0 / s for s in steps]
    b = [1.0 / (bb * s) for bb, s in zip(batches, steps, strict=True)]
    saa, sab, sbb = sum(x * x for x in a), sum(x * y for x, y in zip(a, b, strict=True)), sum(y * y for y in b)
    det = saa * sbb - sab * sab
    if len(a) < 2 or det <= 0:
        return float("nan"), float("nan")
    sa, sb = sum(a), sum(b)
    return (sbb * sa - sab * sb) / det, (saa * sb - sab * sa) / det


def b_crit_of(s_min: float, e_min: float) -> float:
    """E_min / S_min; S_min <= 0 means steps still fall as 1/B at the largest batch: B_crit beyond it."""
    return e_min / s_min if s_min > 0 and e_min > 0 else math.inf if s_min <= 0 else float("nan")


def fit_rms(batches: Sequence[float], steps: Sequence[float], s_min: float, e_min: float) -> float:
    """The fit's own residual: RMS over batches of (S_min + E_min/B) / S - 1."""
    errs = [(s_min + e_min / bb) / s - 1 for bb, s in zip(batches, steps, strict=True)]
    return math.sqrt(sum(e * e for e in errs) / len(errs))


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


# A resample whose fit puts B_crit beyond every batch (S_min <= 0) is an infinite B_crit, above any
# finite one, not an undefined value (which the bootstrap would split between the two ends).
_BEYOND = 1e300


def _ranked(b_crit: float) -> float:
    return _BEYOND if b_crit == math.inf else b_crit


def _unranked(interval: tuple[float, float]) -> tuple[float, float]:
    return tuple(math.inf if v >= _BEYOND else v for v in interval)  # type: ignore[return-value]


def bootstrap_b_crit(batches: Sequence[int], seed_steps: Sequence[Sequence[float]], **kw) -> tuple[float, float]:
    """95% percentile interval of B_crit: each batch's fresh seeds resampled on their own, refitted."""
    def stat(groups: list[list[float]]) -> float:
        return _ranked(b_crit_of(*fit_hyperbola(batches, [mean(g) for g in groups])))
    return _unranked(bootstrap_interval(seed_steps, stat, **kw))


def bootstrap_b_crit_ratio(num: tuple[Sequence[int], Sequence[Sequence[float]]],
                           den: tuple[Sequence[int], Sequence[Sequence[float]]], **kw) -> tuple[float, float]:
    """95% interval of B_crit(num) / B_crit(den), two tasks' fresh seeds resampled batch by batch."""
    n = len(num[1])

    def stat(groups: list[list[float]]) -> float:
        top = b_crit_of(*fit_hyperbola(num[0], [mean(g) for g in groups[:n]]))
        bottom = b_crit_of(*fit_hyperbola(den[0], [mean(g) for g in groups[n:]]))
        return _ranked(top / bottom) if bottom < math.inf else float("nan")
    return _unranked(bootstrap_interval([*num[1], *den[1]], stat, **kw))


def examples_ratio_interval(b0: int, s0: Sequence[float], b: int, s: Sequence[float]) -> tuple[float, float]:
    """95% interval of E(B)/E(B0) = B mean(S(B)) / (B0 mean(S(B0))), both seed groups resampled."""
    return bootstrap_interval([s0, s], lambda g: b * mean(g[1]) / (b0 * mean(g[0])))


def within(lo: float, hi: float, band_lo: float, band_hi: float) -> str:
    """'yes' when the interval [lo, hi] lies inside the band, 'no' when it lies outside it, else
    'undecided' (the interval straddles an edge)."""
    if band_lo <= lo and hi <= band_hi:
        return "yes"
    if hi < band_lo or lo > band_hi:
        return "no"
    return "undecided"


# ---------------------------------------------------------------- training (torch from here on)


@dataclass
class Run:
    steps: float | None  # the interpolated crossing step, None if not reached (or diverged)
    trace: list[tuple[int, float]] = field(default_factory=list)  # (step, val loss of the averaged weights)
    extra: list[tuple[float, ...]] = field(default_factory=list)  # per evaluation, the estimators' values


def train(task, batch: int, lr: float, cap: int, *, seed: int, target: float | None = None, eval_from: int = 1,
          noises: Callable | None = None, micro: int = 0, probe: Callable | None = None, probe_from: int = 0) -> Run:
    """Adam at a constant LR (after a short warmup) until the averaged weights' validation loss reaches
    ``target``. ``noises(opt)`` makes gradient-noise estimators, fed by micro-batches of ``micro``;
    ``probe(step, model)`` is called from ``probe_from`` on at the parameters each gradient was taken at.
    Evaluations start at ``eval_from``; a run already below the target there is run again from step 1."""
    import torch

    torch.manual_seed(seed)
    model = task.make_model()
    avg = copy.deepcopy(model)
    params, avg_params = list(model.parameters()), list(avg.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP_STEPS))
    gen = torch.Generator().manual_seed(seed + 1)
    checks = {s for s in eval_steps(cap) if s >= eval_from} | {cap}
    estimators = noises(opt) if noises is not None else []
    n_micro = batch // micro if estimators else 1
    for noise in estimators:
        noise.attach_accumulation(params, micro, grad_scale=n_micro)
    run, first = Run(None), None
    try:
        for step in range(1, cap + 1):
            x, y = task.batch(gen, batch)
            size = batch // n_micro
            for i in range(n_micro):
                loss = task.loss(model, x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) / n_micro
                loss.backward()
            value = float(loss.detach()) * n_micro
            first = value if first is None else first
            if not math.isfinite(value) or value > DIVERGENCE_FACTOR * first:
                return run
            values = [noise.step() for noise in estimators]  # before opt.step: P is Adam's v_{t-1}
            if probe is not None and step >= probe_from:
                probe(step, model)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            with torch.no_grad():
                torch._foreach_lerp_(avg_params, params, 1.0 - ema_decay(step))
            if step in checks:
                run.trace.append((step, task.val_loss(avg)))
                run.extra.append(tuple(float("nan") if v is None else v for v in values))
                if target is not None and run.trace[-1][1] <= target:
                    if len(run.trace) == 1 and eval_from > 1:  # crossed before the first evaluation
                        return train(task, batch, lr, cap, seed=seed, target=target)
                    run.steps = crossing(run.trace, target)
                    return run
    finally:
        for noise in estimators:
            noise.detach()
    return run


@dataclass
class Point:
    batch: int
    lr: float  # the chosen LR
    grid: list[tuple[float, float | None]]  # (LR, mean steps over the tuning seeds; None: not reached)
    seed_steps: list[float | None]  # the fresh seeds at the chosen LR
    seeds: list[int] = field(default_factory=list)  # which seeds those were
    traces: list[list[tuple[int, float]]] = field(default_factory=list)  # the fresh seeds' curves

    @property
    def steps(self) -> float | None:
        return None if not self.seed_steps or None in self.seed_steps else mean(self.seed_steps)  # type: ignore[arg-type]


def tune_and_measure(task, batch: int, centre: float, cap: int, target: float, *, tune_seeds: Sequence[int],
                     fresh_seeds: Sequence[int], grid: Sequence[int], widen: int = 2,
                     log: Callable[[str], None] = print) -> Point:
    """The LR with the fewest mean steps over ``tune_seeds`` among centre * sqrt(2)^k, k in ``grid``
    (widened by one step past an edge while the best sits there, ``widen`` times at most), then ``fresh_seeds``
    at it. A tuning run is cut once its seeds' sum can no longer beat the best mean, which changes no
    choice."""
    tried: dict[int, float | None] = {}
    ks = list(grid)
    while ks:
        for k in ks:
            best = min((v for v in tried.values() if v is not None), default=None)
            total, steps = 0.0, []
            for seed in tune_seeds:
                budget = cap if best is None else min(cap, math.ceil(best * len(tune_seeds) - total))
                s = train(task, batch, centre * 2 ** (k / 2), max(budget, 1), seed=seed, target=target,
                          eval_from=1 if best is None else int(best / 2)).steps
                if s is None:
                    steps = None
                    break
                total += s
                steps.append(s)
            tried[k] = None if steps is None else mean(steps)
        done = {k: v for k, v in tried.items() if v is not None}
        best_k = min(done, key=done.__getitem__) if done else None
        ks = []
        if best_k is not None and len(tried) < len(grid) + widen:
            if best_k == max(tried):
                ks = [best_k + 1]
            elif best_k == min(tried):
                ks = [best_k - 1]
    lr = centre * 2 ** ((best_k if best_k is not None else 0) / 2)
    point = Point(batch, lr, [(centre * 2 ** (k / 2), v) for k, v in sorted(tried.items())], [], list(fresh_seeds))
    if best_k is None:
        return point
    for seed in fresh_seeds:
        run = train(task, batch, lr, cap, seed=seed, target=target, eval_from=int(tried[best_k] / 2))
        point.seed_steps.append(run.steps)
        point.traces.append(run.trace)
    log(f"  batch {batch:>5}: LR {lr:.4g} (grid {', '.join(f'{a:.3g}:' + ('-' if v is None else f'{v:.0f}') for a, v in point.grid)});"
        f" fresh seeds {', '.join('-' if s is None else f'{s:.0f}' for s in point.seed_steps)}")
    return point


def label_noise_task(task, q: float, seed: int = 4321):
    """The task with each training label replaced, with probability ``q``, by a uniformly random class
    (validation labels untouched): more gradient noise at the same clean optimum."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    y = task.train_y.clone()
    flip = torch.rand(len(y), generator=gen) < q
    classes = int(task.train_y.max()) + 1
    y[flip] = torch.randint(0, classes, (int(flip.sum()),), generator=gen)
    return replace(task, train_y=y)
