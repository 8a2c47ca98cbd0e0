"""The critical batch size of the benchmark tasks, fitted from steps-to-target, against the client's B_noise.

Real CPU training (issue #11) on the two tasks of ``scaling_fidelity.py`` (a tiny LM and an MLP):

1. a pilot at 8x the reference batch B0 fixes the target loss (where the pilot ends) and, on the
   way, measures the gradient noise scale with the client's
   :class:`~largebatch.client.optim.GradientNoiseScale` (gradient accumulation, micro-batches of
   B0, every micro-batch's norm read by a tensor hook): the simple B_noise = tr(Sigma)/|G|^2 and,
   from the same gradients, the Adam-preconditioned B_pre = tr(P Sigma)/(G^T P G),
   P = diag(1/(sqrt(v_hat) + eps)) (``preconditioner=`` the pilot's Adam), both read at the pilot's end;
2. at >= 5 batch sizes from B0 to 64 B0, the steps to reach that target, with Adam at a constant LR
   (after a short warmup) tuned per batch on a small grid around sqrt scaling, extended upwards
   while the best LR is the grid's largest;
3. a fit of McCandlish et al. 2018 eq. 2.11, ``(S/S_min - 1)(E/E_min - 1) = 1``, i.e.
   ``S = S_min + E_min / B`` (linear in 1/B; least squares in relative error), and
   ``B_crit = E_min / S_min``;
4. the examples ratio E(B)/E(B0) at 16x and 64x, measured and as B_noise (and B_pre) predicts it:
   ``(1 + B/B_noise) / (1 + B0/B_noise)``, and the range of B_noise whose prediction is within 25%;
5. the same fit at shallower targets (80, 90, 95% of the pilot's gain), read from the same runs,
   against both estimators where the pilot first reached each target;
6. over the pilot's last steps, B_simple at each step's own (frozen) parameters from thousands of
   fresh examples (the client's ``probe_noise_scale``): how B_noise varies along the trajectory, against the
   in-training EMA estimate, which is a ratio of means (|G|^2 averaged over the steps) and so reads
   near the *harmonic* mean of the local values when |G| swings from step to step.

With ``--seeds N`` (the full run: 3) each batch's tuned LR is run again at N - 1 more seeds (other
initialisations and data orders); steps-to-target is their mean, and the fit and the examples ratios
use that mean: on the MLP one batch's steps-to-target varied by up to 73% between seeds (README),
more than the examples ratio the goal is about moves.

The goal is judged on the simple B_noise, the client's default: for Adam, the optimal-step noise
scale is tr(PHP Sigma)/(G^T PHP G), which is B_pre only where PH ~ I and the simple one where
PHP ~ I (P ~ diag(H)^(-1/2), Adam's second moment tracking a Fisher ~ H); B_pre is reported beside
it to show which the data favour.

Usage: ``python benchmarks/critical_batch.py [--quick] [--seeds N] [--out DIR] [--tasks lm,mlp]``.
Writes ``critical_batch.md`` (the README tables) and ``critical_batch.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import scaling_fidelity as sf  # the tasks are shared with the fidelity benchmark

from largebatch.client.optim import GradientNoiseScale, probe_noise_scale

WARMUP_STEPS = 5  # Adam needs a few steps to settle its second moments; short next to every S here
PILOT_SCALE = 8
# A 100-step memory for the pilot's estimators (as in scaling_fidelity.py): at 8 B0 the MLP's batch is
# far below B_noise near the target, where one step's |G|^2 estimate is mostly noise; with the
# default 20-step EMA the value read at the pilot's end swung from 500 to 2300 (and to NaN, a
# negative |G|^2) between runs and seeds.
PILOT_EMA = 0.99
ADAM_LR = {"lm": 3e-3, "mlp": 2e-3}  # at B0; the grid spans 4x around sqrt scaling from here
TARGET_FRACTION = 0.97  # target = initial loss - 97% of what the pilot gained
# Shallower targets read from the same runs (they stop at the deepest, so every shallower one has been
# crossed by then): does B_noise track B_crit as the target moves? LRs are tuned for the 97% target.
SHALLOW_FRACTIONS = (0.8, 0.9, 0.95)
# The pilot's last PROBE_STEPS steps are each measured at their frozen parameters from PROBE_EXAMPLES
# fresh examples (micro-batches of PROBE_MICRO): many times B_noise, so |G|^2 is resolved at one step.
PROBE_STEPS = 25
PROBE_EXAMPLES = {"lm": 2048, "mlp": 4096}
PROBE_MICRO = 32


@dataclass
class Point:
    batch: int
    lr: float
    steps: float | None  # steps to the target (the mean over seeds), None if a seed did not reach it
    cap: int
    seconds: float
    seed_steps: list[int | None] = field(default_factory=list)  # per seed, seed 0 first (the LR was tuned on it)


@dataclass
class TaskResult:
    task: str
    b0: int
    target: float
    pilot_steps: int
    b_noise: float
    b_noise_trace: list[tuple[int, float, float, float]] = field(default_factory=list)  # step, val, B_noise, B_pre
    b_pre: float = float("nan")  # Adam-preconditioned, from the same pilot
    points: list[Point] = field(default_factory=list)
    s_min: float = float("nan")
    e_min: float = float("nan")
    b_crit: float = float("nan")
    by_depth: list[Depth] = field(default_factory=list)  # the shallower targets, and the main one, from the same runs
    local_b: list[tuple[int, float]] = field(default_factory=list)  # (step, B_simple at that step's parameters)
    b_noise_probe_start: float = float("nan")  # the EMA estimate when the probed steps begin


@dataclass
class Depth:
    fraction: float
    target: float
    steps: list[int | None]  # per batch, the best over the LRs run there
    s_min: float
    e_min: float
    b_crit: float
    crossing_step: int | None  # the pilot's first evaluation at or below the target
    b_noise: float  # both estimators' values there (their 100-step EMAs lag a rising B_noise)
    b_pre: float


def eval_steps(cap: int) -> list[int]:
    """Evaluation points 4% apart (a geometric grid): steps-to-target to within 4% at any scale."""
    out, s = [], 1.0
    while s < cap:
        out.append(round(s))
        s = max(s * 1.04, s + 1)
    return sorted({*out, cap})


def train(task: sf.Task, batch: int, lr: float, cap: int, *, target: float | None = None,
          noises: Callable[[torch.optim.Optimizer], list[GradientNoiseScale]] | None = None, micro: int = 0,
          seed: int = 0, probe: Callable[[int, torch.nn.Module], None] | None = None, probe_from: int = 0):
    """Adam at a constant LR; stops when the validation loss reaches ``target``. ``noises`` makes the
    estimators (given the optimizer, for a preconditioned one); ``probe(step, model)`` is called at
    every step from ``probe_from`` on, at the parameters that step's gradient was taken at. Returns
    the step count at the target (or None), and the (step, val loss, each estimator's value) trace."""
    torch.manual_seed(seed)
    model = task.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP_STEPS))
    gen = torch.Generator().manual_seed(seed + 1)
    checks = set(eval_steps(cap))
    estimators = noises(opt) if noises is not None else []
    n_micro = batch // micro if estimators else 1
    for noise in estimators:
        noise.attach_accumulation(model.parameters(), micro, grad_scale=n_micro)
    trace, first = [], None
    try:
        for step in range(1, cap + 1):
            x, y = task.batch(gen, batch)
            for i in range(n_micro):
                lo = i * (batch // n_micro)
                loss = task.loss(model, x[lo:lo + batch // n_micro], y[lo:lo + batch // n_micro]) / n_micro
                loss.backward()
            value = float(loss.detach()) * n_micro
            first = value if first is None else first
            if not math.isfinite(value) or value > sf.DIVERGENCE_FACTOR * first:
                return None, trace
            values = [noise.step() for noise in estimators]  # before opt.step: P is Adam's v_{t-1}
            if probe is not None and step >= probe_from:
                probe(step, model)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if step in checks:
                val = task.val_loss(model)
                trace.append((step, val, *(v if v is not None else float("nan") for v in values)))
                if target is not None and val <= target:
                    return step, trace
    finally:
        for noise in estimators:
            noise.detach()
    return None, trace


def local_noise_scale(task: sf.Task, model: torch.nn.Module, examples: int, micro: int,
                      gen: torch.Generator) -> float:
    """B_simple at the model's current parameters from ``examples`` fresh examples, in micro-batches
    of ``micro``: the client's :func:`~largebatch.client.optim.probe_noise_scale` (inf while |G|^2 is
    not resolved)."""
    batches = (task.batch(gen, micro) for _ in range(examples // micro))
    probe = probe_noise_scale(model, lambda m, batch: task.loss(m, *batch), batches, micro)
    return probe.value if probe.value is not None else float("inf")


def fit_eq_2_11(points: list[Point]) -> tuple[float, float]:
    """S = S_min + E_min / B, least squares in relative error (each S weighs the same)."""
    rows = [(p.batch, p.steps) for p in points if p.steps is not None]
    if len(rows) < 2:
        return float("nan"), float("nan")
    a = torch.tensor([[1.0 / s, 1.0 / (b * s)] for b, s in rows], dtype=torch.float64)
    y = torch.ones(len(rows), dtype=torch.float64)
    s_min, e_min = torch.linalg.lstsq(a, y).solution.tolist()
    return s_min, e_min


def examples(res: TaskResult, batch: int) -> float | None:
    p = next((p for p in res.points if p.batch == batch and p.steps is not None), None)
    return None if p is None else p.steps * batch


def predicted_ratio(b: float, b_ref: float, b_noise: float) -> float:
    return (1 + b / b_noise) / (1 + b_ref / b_noise)


def b_noise_range(scale: int, b0: int, measured: float, tol: float) -> tuple[float, float]:
    """The B_noise whose predicted ratio (B + s B0)/(B + B0) lies within ``tol`` of ``measured``: the
    prediction falls from s (B -> 0) to 1 (B -> inf), so a band below 1 needs B = inf."""
    def b_for(r: float) -> float:  # the B predicting exactly r
        return 0.0 if r >= scale else math.inf if r <= 1 else b0 * (scale - r) / (r - 1)
    return b_for(measured * (1 + tol)), b_for(measured * (1 - tol))


def depth(res: TaskResult, curves: list[tuple[int, list[tuple[int, float]]]], frac: float, target: float) -> Depth:
    """Steps to ``target`` at each batch from the runs' traces, the eq. 2.11 fit, and the pilot's
    B_noise and B_pre where its validation loss first reached the target."""
    steps = []
    for p in res.points:
        found = [next((s for s, v in c if v <= target), None) for b, c in curves if b == p.batch]
        steps.append(min((s for s in found if s is not None), default=None))
    s_min, e_min = fit_eq_2_11([Point(p.batch, p.lr, s, p.cap, 0.0) for p, s in zip(res.points, steps, strict=True)])
    cross = next((t for t in res.b_noise_trace if t[1] <= target), None)
    return Depth(frac, target, steps, s_min, e_min, e_min / s_min if s_min > 0 else float("inf"),
                 None if cross is None else cross[0], float("nan") if cross is None else cross[2],
                 float("nan") if cross is None else cross[3])


def benchmark_task(task: sf.Task, scales: tuple[int, ...], lr_grid: tuple[float, ...], pilot_steps: int,
                   seeds: int = 1, probe_examples: int = 0) -> TaskResult:
    base = ADAM_LR[task.name]
    b0 = task.b0
    print(f"task {task.name}: B0 {b0}, batches {[s * b0 for s in scales]}, LR grid x{lr_grid} around "
          f"{base} x sqrt(B/B0)", flush=True)
    t0 = time.perf_counter()
    noise = GradientNoiseScale(ema=PILOT_EMA)
    made: list[GradientNoiseScale] = []

    def estimators(opt: torch.optim.Optimizer) -> list[GradientNoiseScale]:
        made.append(GradientNoiseScale(ema=PILOT_EMA, preconditioner=opt))
        return [noise, made[-1]]

    b_pilot = PILOT_SCALE * b0
    local: list[tuple[int, float]] = []
    probe_gen = torch.Generator().manual_seed(12345)
    at_start: list[float] = []

    def probe(step: int, model: torch.nn.Module) -> None:
        if not at_start:
            at_start.append(noise.value or float("nan"))
        if probe_examples:
            local.append((step, local_noise_scale(task, model, probe_examples, PROBE_MICRO, probe_gen)))

    _, trace = train(task, b_pilot, base * math.sqrt(PILOT_SCALE), pilot_steps, noises=estimators, micro=b0,
                     probe=probe, probe_from=pilot_steps - PROBE_STEPS + 1)
    torch.manual_seed(0)
    initial = task.val_loss(task.make_model())
    final = min(t[1] for t in trace[-3:])
    target = initial - TARGET_FRACTION * (initial - final)
    b_noise, b_pre = noise.value or float("nan"), made[0].value or float("nan")
    print(f"  pilot: batch {b_pilot}, {pilot_steps} steps, val {initial:.4f} -> {final:.4f}; target {target:.4f}; "
          f"at the end B_noise {b_noise:.1f}, B_pre {b_pre:.1f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    res = TaskResult(task.name, b0, target, pilot_steps, b_noise, trace, b_pre=b_pre, local_b=local,
                     b_noise_probe_start=at_start[0] if at_start else float("nan"))
    if local:
        print(f"  local B_simple over the pilot's last {len(local)} steps: "
              f"{', '.join(f'{b:.0f}' for _, b in local)}", flush=True)
    s_p, e_p = pilot_steps, pilot_steps * b_pilot
    curves: list[tuple[int, list[tuple[int, float]]]] = []  # every run's (step, val loss) trace, by batch
    for scale in scales:
        batch = scale * b0
        # A tuned run needs at most the pilot's steps above its batch and its examples below: 2x slack.
        cap = int(2 * max(s_p, e_p / batch))
        best: Point | None = None
        factors, best_f, i = list(lr_grid), 0.0, 0
        while i < len(factors):
            f, i = factors[i], i + 1
            lr = base * math.sqrt(scale) * f
            t1 = time.perf_counter()
            steps, run_trace = train(task, batch, lr, cap if best is None or best.steps is None else min(cap, best.steps),
                             target=target)
            p = Point(batch, lr, steps, cap, time.perf_counter() - t1)
            curves.append((batch, [(t[0], t[1]) for t in run_trace]))
            print(f"  batch {batch:>5} LR {lr:.5f}: {steps if steps is not None else '-':>6} steps "
                  f"({p.seconds:.1f}s)", flush=True)
            if steps is not None and (best is None or best.steps is None or steps < best.steps):
                best, best_f = p, f
            # Best at an edge of the grid: the tuned LR may lie beyond it, so extend (2 more at most).
            if i == len(factors) and best is not None and len(factors) < len(lr_grid) + 2:
                if best_f == max(factors):
                    factors.append(best_f * 2)
                elif best_f == min(factors):
                    factors.append(best_f / 2)
        if best is None:
            res.points.append(Point(batch, float("nan"), None, cap, 0.0))
            continue
        best.seed_steps = [best.steps]
        for seed in range(1, seeds):  # the tuned LR again, other initialisations and data orders
            steps, _ = train(task, batch, best.lr, cap, target=target, seed=seed)
            best.seed_steps.append(steps)
        if seeds > 1:
            print(f"  batch {batch:>5} LR {best.lr:.5f} over {seeds} seeds: {best.seed_steps} steps", flush=True)
            best.steps = None if None in best.seed_steps else sum(best.seed_steps) / seeds  # type: ignore[operator]
        res.points.append(best)
    res.s_min, res.e_min = fit_eq_2_11(res.points)
    for frac in (*SHALLOW_FRACTIONS, TARGET_FRACTION):
        res.by_depth.append(depth(res, curves, frac, initial - frac * (initial - final)))
    # S_min <= 0: steps still fall as 1/B at the largest batch, so B_crit lies beyond it (inf).
    res.b_crit = res.e_min / res.s_min if res.s_min > 0 else float("inf")
    return res


def report(results: list[TaskResult]) -> str:
    lines = ["| task | batch | tuned LR (Adam) | steps to target | per seed | examples | fit S_min(1 + B_crit/B) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for p in r.points:
            fit = r.s_min + r.e_min / p.batch
            per_seed = ", ".join("-" if s is None else str(s) for s in p.seed_steps) if len(p.seed_steps) > 1 else "-"
            lines.append(f"| {r.task} | {p.batch} | {p.lr:.4g} | {f'{p.steps:.0f}' if p.steps is not None else f'> {p.cap}'}"
                         f" | {per_seed} | {f'{p.steps * p.batch:.0f}' if p.steps is not None else '-'} | {fit:.0f} |")
    lines += ["", "| task | target val loss | S_min | E_min | B_crit = E_min/S_min | B_noise (client) | "
              "B_noise / B_crit | within 2x | B_pre (Adam-preconditioned) | B_pre / B_crit |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = r.b_noise / r.b_crit if r.b_crit > 0 else float("nan")
        ok = "yes" if 0.5 <= ratio <= 2 else "**no**"
        crit = f"{r.b_crit:.1f}" if math.isfinite(r.b_crit) else f"> {max(p.batch for p in r.points)} (S_min <= 0)"
        pre_ratio = r.b_pre / r.b_crit if r.b_crit > 0 else float("nan")
        lines.append(f"| {r.task} | {r.target:.4f} | {r.s_min:.1f} | {r.e_min:.0f} | {crit} | "
                     f"{r.b_noise:.1f} | {ratio:.2f} | {ok} | {r.b_pre:.1f} | {pre_ratio:.2f} |")
    lines += ["", "| task | scale | E(B)/E(B0) measured | predicted by B_noise | error | within 25% | "
              "predicted by B_pre | error | predicted by fitted B_crit | B_noise within 25% |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        e0 = examples(r, r.b0)
        for scale in (16, 64):
            e = examples(r, scale * r.b0)
            if e0 is None or e is None:
                lines.append(f"| {r.task} | {scale}x | not reached | - | - | - | - | - | - | - |")
                continue
            measured = e / e0
            pred = predicted_ratio(scale * r.b0, r.b0, r.b_noise)
            err = pred / measured - 1
            pre = predicted_ratio(scale * r.b0, r.b0, r.b_pre)
            lo, hi = b_noise_range(scale, r.b0, measured, 0.25)
            lines.append(f"| {r.task} | {scale}x | {measured:.2f} | {pred:.2f} | {err:+.0%} | "
                         f"{'yes' if abs(err) <= 0.25 else '**no**'} | {pre:.2f} | {pre / measured - 1:+.0%} | "
                         f"{predicted_ratio(scale * r.b0, r.b0, r.b_crit):.2f} | "
                         f"{lo:.0f} to {'inf' if math.isinf(hi) else f'{hi:.0f}'} |")
    lines += ["", "| task | target: share of the pilot's gain | target val loss | B_crit (fit) | pilot step at target | "
              "B_noise there | B_noise / B_crit | B_pre there | B_pre / B_crit |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for d in r.by_depth:
            crit = f"{d.b_crit:.1f}" if math.isfinite(d.b_crit) else "inf"
            lines.append(f"| {r.task} | {d.fraction:.0%} | {d.target:.4f} | {crit} | {d.crossing_step} | {d.b_noise:.1f} | "
                         f"{d.b_noise / d.b_crit:.2f} | {d.b_pre:.1f} | {d.b_pre / d.b_crit:.2f} |")
    if any(r.local_b for r in results):
        lines += ["", "| task | pilot steps probed | B_simple at each step's parameters: min | median | mean | "
                  "harmonic mean | EMA estimate (probes start / end) | B_crit (fit) | mean / B_crit | "
                  "harmonic mean / B_crit |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            bs = sorted(b for _, b in r.local_b)
            if not bs:
                continue
            mean, harm = sum(bs) / len(bs), len(bs) / sum(1 / b for b in bs)
            lines.append(f"| {r.task} | {r.local_b[0][0]}-{r.local_b[-1][0]} | {bs[0]:.0f} | {bs[len(bs) // 2]:.0f} | "
                         f"{mean:.0f} | {harm:.0f} | {r.b_noise_probe_start:.0f} / {r.b_noise:.0f} | {r.b_crit:.0f} | "
                         f"{mean / r.b_crit:.2f} | {harm / r.b_crit:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 5 batch sizes, 2 LRs each (CI)")
    parser.add_argument("--tasks", default="lm,mlp")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per batch at its tuned LR, steps-to-target averaged (default: 3; --quick: 1)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: see scaling_fidelity.py
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        scales, grid, pilot, probe = (1, 2, 4, 16, 64), (0.7, 1.4), {"lm": 120, "mlp": 300}, {"lm": 256, "mlp": 512}
    else:
        # Up to 256x: the MLP still scales perfectly at 64x, so its B_crit lies beyond the range.
        scales, grid, pilot, probe = (1, 2, 4, 8, 16, 32, 64, 128, 256), (0.5, 1.0, 2.0), {"lm": 400, "mlp": 1600}, \
            PROBE_EXAMPLES
    seeds = args.seeds if args.seeds is not None else 1 if args.quick else 3
    makers = {"lm": sf.lm_task, "mlp": sf.mlp_task}
    t0 = time.perf_counter()
    # The MLP trains fast: a longer pilot gives it a target loss deep enough for more than a few steps.
    results = [benchmark_task(makers[name](args.quick), scales, grid, pilot[name], seeds, probe[name])
               for name in args.tasks.split(",")]
    table = report(results)
    (args.out / "critical_batch.md").write_text(table + "\n")
    (args.out / "critical_batch.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    print(table)
    print(f"total {time.perf_counter() - t0:.0f}s; wrote {args.out}/critical_batch.{{md,json}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
