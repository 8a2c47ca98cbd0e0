"""The critical batch along a real run, measured by branching, and the engine's batch warmup end to end.

Real CPU training on the two tasks of ``scaling_fidelity.py`` (a tiny LM, an MLP), AdamW:

1. **Ground truth along the run.** A reference run at B0 (the engine's recipe at the reference batch)
   stops at checkpoints log-spaced in the examples seen; at each, the critical batch is measured by
   branching (Merrill et al. 2025), with the client's own ``job.branch_probe`` code driven without a
   service (:class:`OfflineProbe`): short branches at k x B0 (k = 1, 2, 4, ...) on the same examples in
   the same order, the LR moved by the engine's regime rule, every loss on the same held-out examples,
   the state restored afterwards. Scored against it: the streaming statistic (the run's
   ``GradientNoiseScale``, micro-batches of B0/2, read there as the store bins it: 4 bins per doubling of
   the examples, sums of tr(Sigma) and |G|^2), the probe (``probe_noise_scale`` at the
   checkpoint's parameters) and the engine's token-budget prior (``prior_trajectory``; for the MLP an
   example counts as one token).
2. **End to end.** The streaming statistic along that run, 4 points per doubling of the examples, is
   the reference's ``noise_trajectory``; the engine's recipe for ``"batch_size": "ramp"`` (up to 64 B0,
   budget ``same-loss``) is trained against the engine's recipes at fixed B0 and fixed 64 B0 on the ramp's
   examples, and against the reference itself (fixed B0 on the reference's examples, ``B0-ref``): the
   same examples in the same order (a prefix of them for B0-ref), the same initialisation, per seed.
   ``same-loss`` plans the ramp to reach the reference's loss on up to ``max_overhead`` more examples, so
   B0-ref is the promise's own yardstick; at equal examples B0 is also given the examples that overhead
   buys. Paired relative final validation loss: the ramp must be non-inferior to B0 and to B0-ref
   (margin: MLP 0.5%, LM 1%) with >= 30% fewer optimizer steps, and better than 64 B0 (margin 0);
   one-sided 95% bounds (``stats.non_inferiority``), Holm over a task's three comparisons. A 3-seed
   pilot's paired sd sets the seeds (``stats.seeds_for_margin``, true difference 0 for B0 and B0-ref,
   the pilot's mean for 64 B0).

Usage: ``python benchmarks/batch_warmup.py [--quick] [--out DIR] [--tasks lm,mlp] [--parts 1,2] [--window N]
[--max-seeds N]`` (``--parts 1``: the critical batch along the run only; ``--parts 2``: the ramp only, its
reference run without the branches; ``--window N``: the largest branch's steps, the window N x k_max steps of B0).
Diagnostics of part 1 (README, "The branch window on the MLP, tested"): ``--window-share S`` (a window up to S x
the examples seen; default 0.5), ``--branch-lr-power P`` (each branch's LR factor the regime rule's ^ P),
``--branch-seed N`` (another data order for the branches), ``--kmin K`` (the smallest branch K x B0); and
``--summarize DIR...``, one table from several part-1 runs' ``batch_warmup.json``.
Writes ``batch_warmup.md`` (the tables) and ``batch_warmup.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import scaling_fidelity as sf  # the tasks are shared with the fidelity and critical-batch benchmarks

from largebatch.client import _probe
from largebatch.client._probe import BranchProbing
from largebatch.client.optim import GradientNoiseScale, build, probe_noise_scale
from largebatch.scaling_rules import Recipe, recommend, stats
from largebatch.scaling_rules._critical import Trajectory, prior_trajectory
from largebatch.scaling_rules.models import Reference
from largebatch.service.critical_batch import fit_power_law

# AdamW at B0: critical_batch.py's Adam LRs (a little below the fidelity sweep's edge), so the ramp's
# LR, up to ~4x at 64 B0 by the regime rule, stays where AdamW trains these tasks.
BASE_LR = {"lm": 3e-3, "mlp": 2e-3}
WARMUP_RATIO = 0.005  # the fidelity benchmark's reference warmup
TOP = 64  # the ramp's ceiling and the large fixed batch, in B0
MARGIN = {"lm": 0.01, "mlp": 0.005}
MIN_SAVED = 0.30  # the ramp's optimizer steps must be at least this much fewer than fixed B0's
REF_ARM = "B0-ref"  # fixed B0 on the reference's own examples: what budget same-loss promises to match
PEERS = ("B0", f"{TOP}B0", REF_ARM)  # the ramp's comparisons, in the report's order (Holm over them)
REFERENCE_SEED = 1000  # the run the trajectory is read on is not one of the compared seeds
PILOT_SEEDS = 3
# The runs' examples in steps at 64 B0, set here (the shared tasks' defaults serve other benchmarks): the
# full run is the fidelity benchmark's 12,800-step reference; the quick one a short machinery check.
STEPS_AT_TOP = {True: 24, False: 200}
WINDOW = 8  # the largest branch's steps (the client probe's default window: 8 x max(ks) steps of B)
WINDOW_SHARE = 0.5  # a window takes at most this share of the examples the run has seen


@dataclass(frozen=True)
class Setup:
    quick: bool
    fractions: tuple[float, ...]  # checkpoints, as shares of the reference run's examples
    kmax: int  # the largest branch multiple (fewer where the run has seen too little for its window)
    eval_examples: dict[str, int]  # held-out examples every branch loss is read on (micro-batches of B0)
    probe_examples: int
    min_seeds: int
    max_seeds: int
    max_overhead: float | None = None  # the ramp's target.max_overhead (None: the engine's default)
    window: int = WINDOW  # the largest branch's steps: the window is window x k_max steps of B0
    window_share: float = WINDOW_SHARE  # the most of the examples seen a window may take (it lowers k_max)
    lr_power: float = 1.0  # diagnostic: each branch's LR factor is the regime rule's raised to this power
    branch_seed: int = 0  # diagnostic: another data order for the branches (and their held-out examples)
    moment_memory: str = "examples"  # the probe's: branch k's betas beta^k ("steps": the run's betas)
    kmin: int = 1  # diagnostic: the smallest branch multiple, the yardstick the others are read against
    parts: tuple[int, ...] = (1, 2)
    first_seed: int = 0  # the compared seeds are first_seed, first_seed + 1, ... (pilot included)
    seeds: int | None = None  # run exactly this many (pilot included) instead of the power calculation's


def setup(quick: bool, max_seeds: int | None) -> Setup:
    if quick:
        return Setup(True, (0.1, 0.625), 16, {"lm": 512, "mlp": 2048}, 512, 3, max_seeds or 3)
    # Log-spaced by 2.5x; the last at 62.5%: near the end the decayed LR leaves a branch nothing to gain.
    return Setup(False, (0.04, 0.1, 0.25, 0.625), 128, {"lm": 1024, "mlp": 8192}, 4096, 5, max_seeds or 10)


def within(ratio: float, factor: float) -> bool:
    return math.isfinite(ratio) and 1 / factor <= ratio <= factor


def window_multiple(kmax: int, examples_seen: float, b0: int, window: int = WINDOW, share: float = WINDOW_SHARE) -> int:
    """The largest branch multiple (a power of 2, <= kmax, >= 2) whose window, ``window`` x k steps of B0, is
    at most ``share`` (half) of the examples the run has seen: a longer branch measures a later point of the run."""
    k = kmax
    while k > 2 and window * k * b0 > examples_seen * share:
        k //= 2
    return k


def verdict(test: stats.NonInferiority, rejected: bool, alpha: float, tests: int) -> str:
    """The computed word for one comparison after Holm (``rejected``: Holm rejects H0, i.e. worse by the
    margin or more)."""
    if rejected:
        return "non-inferior"
    if test.lower > test.margin:
        return "inferior"
    if test.upper < test.margin:
        return f"undecided (the 95% bound is below the margin but p {test.p:.3g} misses Holm's {alpha / tests:.3g})"
    return (f"undecided (one-sided 95% upper bound {test.upper:+.2%} >= margin {test.margin:+.2%}, lower bound "
            f"{test.lower:+.2%} <= it, {test.n} seeds)")


def power(pilot_a: list[float], pilot_b: list[float], margin: float, s: Setup,
          pilot_c: list[float] | None = None) -> tuple[int, str]:
    """Seeds for the comparisons from the pilot's paired differences (ramp/B0, ramp/64B0 and ramp/B0-ref - 1;
    Holm's worst case over the task's tests)."""
    tests = 2 if pilot_c is None else 3
    sd_a = stats.non_inferiority(pilot_a, margin).sd
    test_b = stats.non_inferiority(pilot_b, 0.0)
    n_a = stats.seeds_for_margin(sd_a, margin, tests=tests, minimum=s.min_seeds, maximum=64)
    n_b = stats.seeds_for_margin(test_b.sd, 0.0, true_difference=test_b.mean, tests=tests, minimum=s.min_seeds,
                                 maximum=64)
    wanted = [n_a, n_b]
    text = (f"power (80%, one-sided 5% with Holm's worst case {0.05 / tests:.3g}): pilot of {len(pilot_a)} seeds, sd "
            f"of ramp/B0 - 1 {sd_a:.3%} at margin {margin:.1%} (true difference 0) -> {n_a} seeds; sd of ramp/64B0 - 1 "
            f"{test_b.sd:.3%} at margin 0 (true difference the pilot's mean {test_b.mean:+.3%}) -> {n_b} seeds")
    if pilot_c is not None:
        sd_c = stats.non_inferiority(pilot_c, margin).sd
        wanted.append(stats.seeds_for_margin(sd_c, margin, tests=tests, minimum=s.min_seeds, maximum=64))
        text += f"; sd of ramp/{REF_ARM} - 1 {sd_c:.3%} at margin {margin:.1%} (true difference 0) -> {wanted[-1]} seeds"
    if s.seeds is not None:
        return s.seeds, text + f"; ran {s.seeds} as --seeds asked (seeds {s.first_seed}..{s.first_seed + s.seeds - 1})"
    n = min(max(wanted), s.max_seeds)
    text += f"; ran {n}" + (f" (capped at --max-seeds {s.max_seeds})" if n < max(wanted) else "")
    if s.quick:
        text += "; quick mode: 3 seeds, below the full run's minimum of 5"
    return n, text


# ---------------------------------------------------------------- training


class OfflineProbe(BranchProbing):
    """The client's branch probe on a bare optimizer, scheduler and estimator: what a Job holds, less the
    service (``send=False``: nothing to send the measurement to)."""

    def __init__(self, optimizer: Any, scheduler: Any, noise: GradientNoiseScale | None, recipe: Recipe):
        self.optimizer, self.scheduler, self.noise, self.recipe = optimizer, scheduler, noise, recipe
        self.world_size, self.follower, self.run, self.complete_timeout = 1, False, None, 0.0


@contextlib.contextmanager
def lr_power(power: float) -> Iterator[None]:
    """Diagnostic (``--branch-lr-power``): the client probe's LR factor for branch k, the regime rule's, raised
    to ``power`` (0: every branch at the run's LR; 1: the probe as the client runs it)."""
    if power == 1:
        yield
        return
    rule = _probe._lr_factor
    _probe._lr_factor = lambda *a: rule(*a) ** power
    try:
        yield
    finally:
        _probe._lr_factor = rule


def examples_of(task: sf.Task, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One seed's data order: n examples drawn once, which every arm reads in the same order."""
    return task.batch(torch.Generator().manual_seed(10_000 + seed), n)


def stream(task: sf.Task, seed: int, size: int) -> Callable[[], Iterator[Any]]:
    """Micro-batches of ``size`` from a fixed seed: the same ones on every call (a branch's examples)."""
    def batches() -> Iterator[Any]:
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield task.batch(gen, size)
    return batches


def train(task: sf.Task, recipe: Recipe, seed: int, data: tuple[torch.Tensor, torch.Tensor], *,
          noise: GradientNoiseScale | None = None,
          at_step: Callable[[int, int, Any, Any, Any], None] | None = None) -> tuple[float, bool]:
    """Follow ``recipe`` (every stage at its batch) on ``data`` from initialisation ``seed``; with
    ``noise``, each step is two micro-batches of half the batch, read by the client's estimator.
    ``at_step(step, examples, model, optimizer, scheduler)`` runs after each step. (val loss, diverged)"""
    torch.manual_seed(seed)
    model = task.make_model()
    optimizer, scheduler = build(model, recipe)
    halves = 2 if noise is not None else 1
    if noise is not None:
        noise.attach_accumulation(model.parameters(), recipe.stages[0].batch_size // 2, grad_scale=2)
    x, y = data
    pos, step, first = 0, 0, None
    try:
        for stage in recipe.stages:
            b = stage.batch_size
            for _ in range(stage.steps):
                value = 0.0
                for i in range(halves):
                    lo, hi = pos + i * b // halves, pos + (i + 1) * b // halves
                    loss = task.loss(model, x[lo:hi], y[lo:hi]) / halves
                    value += float(loss.detach())
                    loss.backward()
                first = value if first is None else first
                if not math.isfinite(value) or value > sf.DIVERGENCE_FACTOR * first:
                    return float("nan"), True
                if noise is not None:
                    noise.step()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                pos, step = pos + b, step + 1
                if at_step is not None:
                    at_step(step, pos, model, optimizer, scheduler)
    finally:
        if noise is not None:
            noise.detach()
    val = task.val_loss(model)
    return val, not math.isfinite(val)


# ---------------------------------------------------------------- part 1: the critical batch along the run


@dataclass
class Checkpoint:
    fraction: float
    step: int
    examples: int
    val_loss: float
    lr: float
    branched: float | None
    interval: tuple[float, float] | None
    ks: list[int]
    note: str
    streaming: float
    probe: float
    prior: float
    seconds: float
    estimator: float = math.nan  # the estimator's own value at that step (JSON only; nan: |G|^2 <= 0 there)
    gains: dict[int, float] = field(default_factory=dict)  # JSON only: k -> the branch's gain, its standard error,
    gain_se: dict[int, float] = field(default_factory=dict)  # the regime rule's LR factor and the examples ratio
    lr_factors: dict[int, float] = field(default_factory=dict)  # read at equal loss
    examples_ratios: dict[int, float] = field(default_factory=dict)
    curve: dict[int, float] = field(default_factory=dict)  # JSON only: the smallest branch's steps -> its gain


@dataclass
class TaskResult:
    task: str
    b0: int
    ref_steps: int
    ref_val: float
    checkpoints: list[Checkpoint] = field(default_factory=list)
    trajectory: list[tuple[float, float]] = field(default_factory=list)  # (examples seen, streaming B_noise)
    fit: str = ""  # the power law the ramp was planned on
    ramp: list[tuple[int, int, float]] = field(default_factory=list)  # (batch, steps, peak LR) per stage
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> batch, steps, examples, losses
    tests: list[dict[str, Any]] = field(default_factory=list)
    power: str = ""
    seconds: float = 0.0


def reference_of(task: sf.Task, steps: int) -> dict[str, Any]:
    return {"batch_size": task.b0, "lr": BASE_LR[task.name], "optimizer": "adamw", "steps": steps,
            "warmup_ratio": WARMUP_RATIO}


def request(task: sf.Task, reference: dict[str, Any], target: dict[str, Any], **extra: Any) -> dict[str, Any]:
    model = {"params": task.params, "family": "transformer" if task.name == "lm" else "other"}
    return {"model": model, "reference": reference, "target": target, **extra}


def prior_at(task: sf.Task, steps: int, examples: float) -> float:
    """The engine's token-budget prior at ``examples`` of the reference run (the MLP: one token per example)."""
    seq = task.seq or 1
    ref = Reference(batch_size=task.b0, lr=BASE_LR[task.name], steps=steps, seq_len=seq)
    pts = prior_trajectory(ref, float(steps * task.b0 * seq))
    traj = Trajectory.of(ref.model_copy(update={"noise_trajectory": pts}))
    assert traj is not None
    return traj.at(examples)


def reference_run(task: sf.Task, s: Setup, res: TaskResult) -> None:
    steps = res.ref_steps
    recipe = recommend(request(task, reference_of(task, steps), {"batch_size": task.b0, "steps": steps}))
    noise = GradientNoiseScale()
    marks = {max(1, round(f * steps)): f for f in s.fractions} if 1 in s.parts else {}
    bins: dict[int, list[float]] = {}  # the store's bins, 4 per doubling: examples, reads, tr(Sigma), |G|^2 summed
    loss_fn = lambda m, batch: task.loss(m, *batch)  # noqa: E731

    def at_step(step: int, seen: int, model: Any, optimizer: Any, scheduler: Any) -> None:
        if noise.grad_sq is not None and noise.trace_sigma is not None:
            acc = bins.setdefault(math.floor(4 * math.log2(seen)), [0.0, 0.0, 0.0, 0.0])
            for i, v in enumerate((seen, 1.0, noise.trace_sigma, noise.grad_sq)):
                acc[i] += v
        if step not in marks:
            return
        t0 = time.perf_counter()
        kmax = max(window_multiple(s.kmax, seen, task.b0, s.window, s.window_share), 2 * s.kmin)
        ks = [2 ** i for i in range(int(math.log2(s.kmin)), int(math.log2(kmax)) + 1)]
        with lr_power(s.lr_power):
            probe = OfflineProbe(optimizer, scheduler, noise, recipe).branch_probe(
                model, stream(task, 20_000 + step + 100_000 * s.branch_seed, task.b0), loss_fn, ks=ks, steps=s.window * kmax,
                batch_size=task.b0, eval_micro_batches=s.eval_examples[task.name] // task.b0,
                moment_memory=s.moment_memory, send=False)
        gen = torch.Generator().manual_seed(30_000 + step)
        local = probe_noise_scale(model, loss_fn, (task.batch(gen, 32) for _ in range(s.probe_examples // 32)), 32)
        model.eval()
        val = task.val_loss(model)
        model.train()
        # The estimator as the store keeps it (its bin's sums): one step's smoothed |G|^2 at B0 can be <= 0.
        here = bins.get(math.floor(4 * math.log2(seen)), [0.0, 0.0, 0.0, 0.0])
        cp = Checkpoint(marks[step], step, seen, val, optimizer.param_groups[0]["lr"], probe.critical_batch,
                        probe.interval, ks, probe.note, here[2] / here[3] if here[3] > 0 < here[2] else math.nan,
                        local.value if local.value is not None else math.inf, prior_at(task, steps, seen),
                        time.perf_counter() - t0, noise.value or math.nan, dict(probe.gains), dict(probe.gain_se),
                        dict(probe.lr_factors), dict(probe.examples_ratios),
                        {n: probe.loss_before - v for n, v in probe.curve.items()})
        res.checkpoints.append(cp)
        print(f"  {task.name} checkpoint {cp.fraction:.3g} (step {step}, {seen} examples, val {val:.4f}): branched "
              f"{_num(cp.branched)}; streaming {cp.streaming:.4g}, probe {cp.probe:.4g}, prior {cp.prior:.4g} "
              f"({cp.seconds:.1f}s) [{probe.note}]", flush=True)
        print("    k: gain (se), LR factor, E(kB)/E(B) read: " + "; ".join(
            f"{k}: {probe.gains[k]:.4g} ({probe.gain_se[k]:.2g}), x{probe.lr_factors[k]:.3g}, "
            f"{_num(probe.examples_ratios.get(k), '.3g')}" for k in ks), flush=True)
        print(f"    the k = {ks[0]} branch's gain after n of its steps: " + ", ".join(f"{n}: {g:.4g}" for n, g in cp.curve.items()),
              flush=True)

    data = examples_of(task, REFERENCE_SEED, steps * task.b0)
    res.ref_val, _ = train(task, recipe, REFERENCE_SEED, data, noise=noise, at_step=at_step)
    res.trajectory = [(x / n, tr / g2) for _, (x, n, tr, g2) in sorted(bins.items()) if g2 > 0 and tr > 0]


# ---------------------------------------------------------------- part 2: the ramp end to end


def measured_trajectory(res: TaskResult) -> list[dict[str, float]]:
    """What a user passes as ``reference.noise_trajectory``: the study's fit of the run's binned streaming
    points (the service's power law, ``fit.points``, uncalibrated: no branch probe sent), else the points."""
    fit = fit_power_law([res.trajectory])
    if isinstance(fit, str):
        res.fit = f"no fit ({fit}): the binned points themselves"
        return [{"examples_seen": x, "noise_scale": b} for x, b in res.trajectory]
    res.fit = (f"B_noise = {fit.coefficient:.4g} x examples^{fit.exponent:.3f} (95% {fit.exponent_low:.3f}.."
               f"{fit.exponent_high:.3f}, {fit.interval}; log residual rms {fit.residual_rms:.2f}) over "
               f"{len(res.trajectory)} binned points")
    return [{"examples_seen": p.examples_seen, "noise_scale": p.noise_scale, "noise_scale_low": p.noise_scale_low}
            for p in fit.points]


def end_to_end(task: sf.Task, s: Setup, res: TaskResult) -> None:
    ref = reference_of(task, res.ref_steps)
    ref["noise_trajectory"] = measured_trajectory(res)
    target = {"batch_size": "ramp", "max_batch_size": TOP * task.b0}
    if s.max_overhead is not None:
        target["max_overhead"] = s.max_overhead
    ramp = recommend(request(task, ref, target, budget="same-loss"))
    examples = sum(st.batch_size * st.steps for st in ramp.stages)
    recipes = {"ramp": ramp,
               "B0": recommend(request(task, ref, {"batch_size": task.b0, "steps": examples // task.b0})),
               f"{TOP}B0": recommend(request(task, ref, {"batch_size": TOP * task.b0,
                                                         "steps": max(1, round(examples / (TOP * task.b0)))})),
               REF_ARM: recommend(request(task, ref, {"batch_size": task.b0, "steps": res.ref_steps}))}
    res.ramp = [(st.batch_size, st.steps, st.peak_lr) for st in ramp.stages]
    print(f"  {task.name} ramp {' -> '.join(str(b) for b, *_ in res.ramp)}: {ramp.total_steps} steps, {examples} "
          f"examples; B0 {recipes['B0'].total_steps} steps, {TOP}B0 {recipes[f'{TOP}B0'].total_steps}", flush=True)
    for name, r in recipes.items():
        res.arms[name] = {"batches": sorted({st.batch_size for st in r.stages}), "steps": r.total_steps,
                          "examples": sum(st.batch_size * st.steps for st in r.stages),
                          "peak_lr": max(st.peak_lr for st in r.stages), "losses": [], "diverged": []}

    def run_seed(seed: int) -> None:
        data = examples_of(task, seed, max(a["examples"] for a in res.arms.values()))
        for name, r in recipes.items():
            t0 = time.perf_counter()
            val, diverged = train(task, r, seed, data)
            res.arms[name]["losses"].append(val)
            res.arms[name]["diverged"].append(diverged)
            print(f"    seed {seed} {name:>5}: val {val:.4f}{' DIVERGED' if diverged else ''} "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)

    first = s.first_seed
    for seed in range(first, first + PILOT_SEEDS):
        run_seed(seed)
    rel = [paired(res, peer) for peer in PEERS]
    n, res.power = power(*rel[:2], MARGIN[task.name], s, rel[2]) if all(len(d) >= 2 for d in rel) else (
        s.seeds or PILOT_SEEDS, "power: a pilot run diverged, no sd to plan from")
    print(f"  {task.name} {res.power}", flush=True)
    for seed in range(first + PILOT_SEEDS, first + n):
        run_seed(seed)
    compare(res)


def paired(res: TaskResult, peer: str) -> list[float]:
    """ramp / peer - 1 per seed, where neither diverged."""
    a, b = res.arms["ramp"], res.arms[peer]
    return [x / y - 1 for x, y, dx, dy in zip(a["losses"], b["losses"], a["diverged"], b["diverged"], strict=True)
            if not (dx or dy)]


def compare(res: TaskResult, alpha: float = 0.05) -> None:
    peers = [(p, 0.0 if p == f"{TOP}B0" else MARGIN[res.task]) for p in PEERS if p in res.arms]
    ramp_diverged = [i for i, d in enumerate(res.arms["ramp"]["diverged"]) if d]
    diffs = [paired(res, p) for p, _ in peers]
    tests = [stats.non_inferiority(d, m, alpha) if len(d) >= 2 else None for d, (_, m) in zip(diffs, peers, strict=True)]
    rejected = stats.holm([t.p if t is not None else 1.0 for t in tests], alpha)
    for (peer, margin), d, t, rej in zip(peers, diffs, tests, rejected, strict=True):
        if ramp_diverged:
            word = f"inferior (the ramp diverged at seed(s) {ramp_diverged})"
        elif t is None:
            word = "undecided (fewer than 2 seeds where both arms trained)"
        else:
            word = verdict(t, rej, alpha, len(peers))
        res.tests.append({"peer": peer, "margin": margin, "differences": d, "verdict": word,
                          **({k: getattr(t, k) for k in ("n", "mean", "sd", "upper", "lower", "p")} if t else {})})


# ---------------------------------------------------------------- the report


def _num(v: float | None, fmt: str = ".4g") -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, fmt)


def _ratio(est: float, truth: float | None) -> tuple[str, str, str]:
    if truth is None or not math.isfinite(est):
        return "-", "-", "-"
    r = est / truth
    return f"{r:.2f}", "yes" if within(r, 3) else "**no**", "yes" if within(r, 2) else "**no**"


ESTIMATES = (("streaming", "streaming B_noise"), ("probe", "probe B_simple"), ("prior", "token-budget prior"))


def branch_setting(s: Setup) -> list[str]:
    """The branches' settings where they are not the benchmark's own (for the table's title)."""
    out = []
    if s.window != WINDOW:
        out.append(f"; the largest branch {s.window} steps (window {s.window} x k_max steps of B0)")
    if s.window_share != WINDOW_SHARE:
        out.append(f"; a window up to {s.window_share:g} x the examples seen")
    if s.kmax != setup(s.quick, None).kmax:
        out.append(f"; branches up to {s.kmax} x B0")
    if s.kmin != 1:
        out.append(f"; diagnostic: the smallest branch {s.kmin} x B0")
    if s.branch_seed:
        out.append(f"; diagnostic: the branches' data order {s.branch_seed}")
    if s.lr_power != 1:
        out.append(f"; diagnostic: each branch's LR factor the regime rule's ^ {s.lr_power:g}")
    if s.moment_memory != "examples":
        out.append("; diagnostic: every branch at the run's betas (moment memory in steps)")
    return out


def report(results: list[TaskResult], quick: bool, max_overhead: float | None = None, s: Setup | None = None) -> str:
    s = s or setup(quick, None)
    mode = "quick mode: --quick, small models, 2 checkpoints, 3 seeds" if quick else "full run"
    ramp_mode = mode + ("" if max_overhead is None else f"; the ramp at max_overhead {max_overhead:g}")
    lines = (critical_report(results, mode + "".join(branch_setting(s)), summary=2 not in s.parts)
             if 1 in s.parts else [])
    if 2 in s.parts:
        lines += ramp_report(results, ramp_mode)
    return "\n".join(lines)


def critical_report(results: list[TaskResult], mode: str, summary: bool = False) -> list[str]:
    head = ["| task | checkpoint (share of run) | examples seen | val loss | branched B_crit (90%) | k x B0 |"]
    for _, label in ESTIMATES:
        head.append(f" {label} | / B_crit | within 3x | within 2x |")
    lines = [f"Critical batch along the reference run at B0 ({mode}); B in examples (LM: sequences); the prior "
             "counts an MLP example as one token; '-': not identified by the branches (the log says why) or, for the "
             "streaming statistic, its bin's smoothed |G|^2 <= 0 (unresolved at B0)", "",
             "".join(head), "|---" * (6 + 4 * len(ESTIMATES)) + "|"]
    for r in results:
        for c in r.checkpoints:
            read = (f"{_num(c.branched)}" + ("" if c.interval is None else f" ({_num(c.interval[0])}..{_num(c.interval[1])})")
                    if c.branched else _unread({"note": c.note, "ks": c.ks}, r.b0))
            row = (f"| {r.task} | {c.fraction:.3g} | {c.examples} | {c.val_loss:.4f} | {read} | "
                   f"{c.ks[0] * r.b0}..{c.ks[-1] * r.b0} |")
            for key, _ in ESTIMATES:
                est = getattr(c, key)
                row += f" {_num(est)} | {' | '.join(_ratio(est, c.branched))} |"
            lines.append(row)
    lines += ["", "| task | estimate | checkpoints within 3x | within 2x | geometric mean of estimate / B_crit | "
              "read by the branches |", "|---|---|---|---|---|---|"]
    for r in results:
        read = sum(1 for c in r.checkpoints if c.branched)
        above = sum(1 for c in r.checkpoints if not c.branched and "cost no examples" in c.note)
        reach = f"{read}/{len(r.checkpoints)}" + (f" ({above} above their reach)" if above else "")
        for key, label in ESTIMATES:
            rs = [getattr(c, key) / c.branched for c in r.checkpoints if c.branched and math.isfinite(getattr(c, key))]
            gm = math.exp(sum(math.log(x) for x in rs) / len(rs)) if rs else math.nan
            lines.append(f"| {r.task} | {label} | {sum(within(x, 3) for x in rs)}/{len(r.checkpoints)} | "
                         f"{sum(within(x, 2) for x in rs)}/{len(r.checkpoints)} | {_num(gm, '.2f')} | {reach} |")
    lines.append("")
    for r in results if summary else []:
        lines.append(f"- {r.task}: reference run at B0 ({r.ref_steps} steps, seed {REFERENCE_SEED}) val {r.ref_val:.4f}; "
                     f"branches {sum(c.seconds for c in r.checkpoints):.0f}s, task {r.seconds:.0f}s")
    return lines


def ramp_report(results: list[TaskResult], ramp_mode: str) -> list[str]:
    lines = [f"Batch warmup end to end ({ramp_mode}): every arm on the ramp's examples but {REF_ARM}, fixed B0 on the "
             f"reference's (what budget same-loss promises to match), paired by seed; against {TOP}B0 the margin is 0, "
             "so non-inferior there means better", "",
              "| task | arm | batch | optimizer steps | examples | peak LR | seeds | val loss per seed | mean |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name, a in r.arms.items():
            batches = " -> ".join(map(str, a["batches"]))
            losses = ", ".join(_num(x, ".4f") for x in a["losses"])
            ok = [x for x in a["losses"] if math.isfinite(x)]
            lines.append(f"| {r.task} | {name} | {batches} | {a['steps']} | {a['examples']} | {a['peak_lr']:.4g} | "
                         f"{len(a['losses'])} | {losses} | {_num(sum(ok) / len(ok) if ok else None, '.4f')} |")
    lines += ["", "| task | comparison | margin | seeds | mean ramp/peer - 1 | sd | one-sided 95% upper bound | p | "
              "verdict (Holm over the task's comparisons) | steps: ramp / peer |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for t in r.tests:
            saved = "-" if t["peer"] == f"{TOP}B0" else _saved(r.arms["ramp"]["steps"], r.arms[t["peer"]]["steps"])
            stat = (f"{t['n']} | {t['mean']:+.3%} | {t['sd']:.3%} | {t['upper']:+.3%} | {t['p']:.3g}" if "n" in t
                    else "- | - | - | - | -")
            lines.append(f"| {r.task} | ramp vs {t['peer']} | {t['margin']:.1%} | {stat} | {t['verdict']} | {saved} |")
    lines.append("")
    for r in results:
        lines.append(f"- {r.task}: {_overhead_value(r)}")
        lines.append(f"- {r.task}: reference run at B0 ({r.ref_steps} steps, seed {REFERENCE_SEED}) val {r.ref_val:.4f}; "
                     f"ramp {' -> '.join(f'{b} x {n}' for b, n, _ in r.ramp)} (batch x steps), planned on {r.fit}; "
                     f"{r.power}; {r.seconds:.0f}s")
    return lines


def _saved(ramp: int, peer: int) -> str:
    saved = 1 - ramp / peer
    return f"{ramp} / {peer}: {saved:.0%} fewer (>= {MIN_SAVED:.0%}: {'yes' if saved >= MIN_SAVED else '**no**'})"


def _overhead_value(r: TaskResult) -> str:
    """What equal examples gives fixed B0 over the reference's budget: the examples the ramp's plan spends
    beyond the reference's, as B0 turns them into loss (paired B0 / B0-ref - 1, two-sided 95% interval)."""
    if REF_ARM not in r.arms or "B0" not in r.arms:
        return "no B0-ref arm"
    a, b = r.arms["B0"], r.arms[REF_ARM]
    d = [x / y - 1 for x, y, dx, dy in zip(a["losses"], b["losses"], a["diverged"], b["diverged"], strict=True)
         if not (dx or dy)]
    extra = a["examples"] / b["examples"] - 1
    if len(d) < 2:
        return f"B0 on the ramp's examples ({extra:+.1%} over the reference's): fewer than 2 seeds to compare"
    t = stats.non_inferiority(d, 0.0, alpha=0.025)  # one-sided 2.5% each side: a two-sided 95% interval
    return (f"B0 on the ramp's examples ({extra:+.1%} over the reference's) against B0-ref: {t.mean:+.3%} "
            f"[{t.lower:+.3%}, {t.upper:+.3%}] over {t.n} seeds, the loss those examples buy fixed B0 (what "
            "equal examples charges the ramp beyond its plan)")


def _unread(c: dict[str, Any], b0: int) -> str:
    """Why a checkpoint's branches gave no B_crit, in a word (from the probe's note)."""
    note = c["note"]
    if "cost no examples" in note:
        return f"above {c['ks'][-1] * b0} (no cost seen)"
    if "gained nothing" in note:
        return f"below {c['ks'][0] * b0} (nothing gained)"
    if "no resolved progress" in note:
        return "k = 1 branch: no resolved gain"
    return "-"


def summarize(paths: list[pathlib.Path]) -> str:
    """One table of the critical batch along the run from part-1 runs under different branch settings (each
    run's ``batch_warmup.json``): per checkpoint, the branches' reading next to the streaming statistic."""
    lines = ["Branched critical batch by branch setting (each row from its run's batch_warmup.json; the largest "
             "branch takes 'steps' steps of its window, the window 'steps' x k_max steps of B0 and, at share s, at most "
             "s x the examples seen; gains: the held-out loss before the window minus after it, se over the evaluation "
             "sample only; '/ B_crit': streaming B_noise / branched B_crit)", "",
             "| task | checkpoint | examples seen | run (its flags) | k x B0 | steps | branched B_crit (90%) | gain, "
             "smallest k (se) | gain, largest k (se) | its LR factor | streaming B_noise | / B_crit | within 3x |",
             "|---" * 13 + "|"]
    summary = ["", "| task | run (its flags) | checkpoints identified | streaming within 3x | geometric mean of "
               "streaming / B_crit | largest branch's gain < 0 | run time |", "|---|---|---|---|---|---|---|"]
    rows = []
    for path in paths:
        data = json.loads((path / "batch_warmup.json").read_text())
        st = data["setup"]
        default_kmax = setup(bool(st.get("quick")), None).kmax
        flags = [f"--window {st.get('window', WINDOW)}" if st.get("window", WINDOW) != WINDOW else "",
                 f"--window-share {st.get('window_share', WINDOW_SHARE):g}"
                 if st.get("window_share", WINDOW_SHARE) != WINDOW_SHARE else "",
                 f"--branch-lr-power {st.get('lr_power', 1.0):g}" if st.get("lr_power", 1.0) != 1 else "",
                 f"--branch-seed {st.get('branch_seed', 0)}" if st.get("branch_seed", 0) else "",
                 f"--kmin {st.get('kmin', 1)}" if st.get("kmin", 1) != 1 else "",
                 f"--kmax {st['kmax']}" if st.get("kmax", default_kmax) != default_kmax else "",
                 f"--moment-memory {st.get('moment_memory', 'steps')}"
                 if st.get("moment_memory", "steps") != "examples" else ""]
        label = " ".join(f for f in flags if f) or "(the defaults)"
        for t in data["tasks"]:
            ratios, negative = [], 0
            for c in t["checkpoints"]:
                top, low = str(c["ks"][-1]), str(c["ks"][0])
                b, iv = c["branched"], c["interval"]
                read = _unread(c, t["b0"]) if b is None else f"{_num(b)} ({_num(iv[0])}..{_num(iv[1]) if iv[1] < math.inf else 'inf'})"
                r = c["streaming"] / b if b else math.nan
                if math.isfinite(r):
                    ratios.append(r)
                negative += c["gains"][top] < 0
                rows.append((t["task"], c["fraction"], label, (
                    f"| {t['task']} | {c['fraction']:.3g} | {c['examples']} | {label} | {c['ks'][0] * t['b0']}.."
                    f"{c['ks'][-1] * t['b0']} | {st.get('window', WINDOW)} | {read} | {c['gains'][low]:.4f} "
                    f"({c['gain_se'][low]:.4f}) | {c['gains'][top]:.4f} ({c['gain_se'][top]:.4f}) | "
                    f"x{c['lr_factors'][top]:.3g} | {_num(c['streaming'])} | {_num(r, '.2f')} | "
                    f"{'-' if not math.isfinite(r) else 'yes' if within(r, 3) else '**no**'} |")))
            gm = math.exp(sum(math.log(x) for x in ratios) / len(ratios)) if ratios else math.nan
            n = len(t["checkpoints"])
            summary.append(f"| {t['task']} | {label} | {len(ratios)}/{n} | {sum(within(x, 3) for x in ratios)}/{n} | "
                           f"{_num(gm, '.2f')} | {negative}/{n} | {data['seconds']:.0f}s |")
    lines += [row for *_, row in sorted(rows, key=lambda x: (x[0], x[1]))]
    return "\n".join(lines + summary)


def benchmark_task(name: str, s: Setup) -> TaskResult:
    task = {"lm": sf.lm_task, "mlp": sf.mlp_task}[name](s.quick)
    task.examples = TOP * task.b0 * STEPS_AT_TOP[s.quick]
    task.params = sum(p.numel() for p in task.make_model().parameters())
    t0 = time.perf_counter()
    res = TaskResult(name, task.b0, task.examples // task.b0, math.nan)
    print(f"task {name}: {task.params:,} parameters, B0 {task.b0}, reference {res.ref_steps} steps", flush=True)
    reference_run(task, s, res)
    if 2 in s.parts:
        end_to_end(task, s, res)
    res.seconds = time.perf_counter() - t0
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models, 2 checkpoints, 3 seeds (CI)")
    parser.add_argument("--tasks", default="lm,mlp")
    parser.add_argument("--max-seeds", type=int, default=None, help="cap on the power calculation (default 10; quick 3)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="run exactly N seeds (the 3-seed pilot included) instead of the power calculation's")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="the first compared seed (default 0): a replication on seeds no verdict has seen")
    parser.add_argument("--max-overhead", type=float, default=None,
                        help="the ramp's target.max_overhead (default: the engine's, 0.2)")
    parser.add_argument("--parts", default="1,2",
                        help="1: the critical batch along the run; 2: the ramp end to end (its reference run without "
                             "the branches); default both")
    parser.add_argument("--window", type=int, default=WINDOW,
                        help=f"the largest branch's steps: the window is N x k_max steps of B0 (default {WINDOW})")
    parser.add_argument("--window-share", type=float, default=WINDOW_SHARE,
                        help=f"the most of the examples seen a window may take, lowering k_max (default {WINDOW_SHARE})")
    parser.add_argument("--branch-lr-power", type=float, default=1.0,
                        help="diagnostic: each branch's LR factor is the regime rule's to this power (default 1: "
                             "the client probe's own; 0: every branch at the run's LR)")
    parser.add_argument("--branch-seed", type=int, default=0,
                        help="diagnostic: another data order for the branches and their held-out examples (default 0)")
    parser.add_argument("--kmax", type=int, default=None,
                        help="the largest branch multiple, a power of 2 (default 128; quick 16), fewer where the "
                             "window would pass --window-share of the examples seen")
    parser.add_argument("--kmin", type=int, default=1,
                        help="diagnostic: the smallest branch multiple, a power of 2 (default 1: B0 is the yardstick)")
    parser.add_argument("--moment-memory", choices=["examples", "steps"], default="examples",
                        help="diagnostic: the probe's moment_memory (default examples: branch k's betas beta^k; "
                             "steps: the run's betas in every branch, the probe before 2026-12-07)")
    parser.add_argument("--summarize", type=pathlib.Path, nargs="+", metavar="DIR",
                        help="print one table from part-1 runs' DIR/batch_warmup.json (different branch settings) "
                             "and exit")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "out")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    torch.set_num_threads(1)  # tiny models: one thread is fastest and the timings comparable
    parts = tuple(sorted({int(p) for p in args.parts.split(",")}))
    if not parts or not set(parts) <= {1, 2}:
        parser.error(f"--parts takes 1, 2 or 1,2, got {args.parts!r}")
    if args.kmin < 1 or args.kmin & (args.kmin - 1):
        parser.error(f"--kmin must be a power of 2, got {args.kmin}")
    if args.kmax is not None and (args.kmax < 2 or args.kmax & (args.kmax - 1)):
        parser.error(f"--kmax must be a power of 2 >= 2, got {args.kmax}")
    if args.seeds is not None and args.seeds < PILOT_SEEDS:
        parser.error(f"--seeds must be >= the {PILOT_SEEDS}-seed pilot, got {args.seeds}")
    last = args.first_seed + (args.seeds or 64) - 1  # the power calculation runs at most 64
    if args.first_seed < 0 or args.first_seed <= REFERENCE_SEED <= last:
        parser.error(f"--first-seed: the seeds {args.first_seed}..{last} must be >= 0 and leave out the reference "
                     f"run's seed {REFERENCE_SEED}")
    if args.window < 1:
        parser.error(f"--window must be >= 1, got {args.window}")
    s = setup(args.quick, args.max_seeds)
    s = dataclasses.replace(s, max_overhead=args.max_overhead, window=args.window, kmax=args.kmax or s.kmax,
                            parts=parts, window_share=args.window_share, lr_power=args.branch_lr_power,
                            branch_seed=args.branch_seed, kmin=args.kmin, moment_memory=args.moment_memory,
                            first_seed=args.first_seed, seeds=args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = [benchmark_task(name, s) for name in args.tasks.split(",")]
    table = report(results, args.quick, args.max_overhead, s)
    elapsed = time.perf_counter() - t0
    (args.out / "batch_warmup.md").write_text(table + "\n")
    (args.out / "batch_warmup.json").write_text(json.dumps(
        {"quick": args.quick, "seconds": elapsed, "setup": asdict(s), "tasks": [asdict(r) for r in results]},
        indent=1, default=str))
    print(table)
    print(f"elapsed {elapsed:.1f}s; wrote {args.out}/batch_warmup.{{md,json}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
