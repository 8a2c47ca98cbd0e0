"""The critical batch size of the benchmark tasks, from steps-to-target, against the client's B_noise.

Real CPU training on the two tasks of ``scaling_fidelity.py`` (a tiny LM and an MLP), with the
steps-to-target protocol of Shallue et al. 2019 (helpers in ``_steps_to_target.py``):

1. a pilot at 8x the reference batch B0 fixes the target loss (97% of the pilot's gain) and, on the
   way, measures the gradient noise scale with the client's
   :class:`~largebatch.client.optim.GradientNoiseScale` (micro-batches of B0, a 100-step EMA, read at
   the pilot's end): the simple B_noise = tr(Sigma)/|G|^2 and, from the same gradients, the
   Adam-preconditioned B_pre = tr(P Sigma)/(G^T P G), P = diag(1/(sqrt(v_hat) + eps));
2. at each batch size, Adam at a constant LR (after a 5-step warmup) re-tuned on a sqrt(2)-spaced grid
   (centred on the previous batch's choice, scaled by sqrt(B)) against the mean steps-to-target of the
   tuning seeds, widened past an edge
   while the best LR sits there; then fresh seeds (never used for tuning) at the chosen LR. The loss is
   that of exponentially averaged weights, and the step where it crosses the target is interpolated
   (linearly in log step) between evaluation points 10% apart;
3. McCandlish et al. 2018 eq. 2.11, S = S_min (1 + B_crit/B), fitted to the fresh seeds' mean steps
   (least squares in relative error), with its own RMS relative residual: above 15% the hyperbola
   does not describe the task, and the task is not scored on it;
4. 95% bootstrap intervals (each batch's fresh seeds resampled on their own, refitted) on B_crit, on
   B_noise/B_crit, on the measured examples ratio E(B)/E(B0) at 16x and 64x;
5. dose-response: the MLP again with training labels replaced by random classes with probability q:
   the ratio of measured critical batches between noise levels against the ratio of the pilots' B_noise;
6. the same fit at shallower targets from the fresh seeds' curves, and, over the pilot's last steps,
   B_simple at each step's frozen parameters from thousands of fresh examples (``probe_noise_scale``).

Verdicts are computed from the intervals: "yes" when the interval lies inside the goal's band, "no"
when outside it, "undecided" when it straddles an edge; "not scored" where the hyperbola does not fit.

The goals: B_noise within 3x of B_crit (2x the stretch); the examples ratio B_noise predicts within 25%
of the measured one at 16x and 64x; the dose-response's predicted ratio within 1.5x of the measured one.

Usage: ``python benchmarks/critical_batch.py [--quick] [--seeds N] [--out DIR] [--tasks lm,mlp]`` (the
full run: about 35 minutes on one quiet thread, most of it the LM's largest batches; ``--quick``: ~60 s).
Writes ``critical_batch.md`` (the README tables) and ``critical_batch.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _steps_to_target as stt
import scaling_fidelity as sf  # the tasks are shared with the fidelity benchmark

from largebatch.client.optim import GradientNoiseScale, probe_noise_scale

PILOT_SCALE = 8
# A 100-step memory for the pilot's estimators (as in scaling_fidelity.py): at 8 B0 the MLP's batch is
# far below B_noise near the target, where one step's |G|^2 estimate is mostly noise.
PILOT_EMA = 0.99
PILOT_SEED = 10_000
TARGET_FRACTION = 0.97  # target = initial loss - 97% of what the pilot gained
SHALLOW_FRACTIONS = (0.8, 0.9, 0.95)  # read from the same fresh runs: does B_noise track B_crit with depth?
PROBE_STEPS = 25
PROBE_MICRO = 32
TUNE_SEEDS = (0, 1)
# Fresh seeds are FRESH_SEED_BASE + 100 j + i at the j-th batch: disjoint from the tuning seeds and the
# pilot's, and different at every batch, so the batches' steps are independent, as the bootstrap assumes.
FRESH_SEED_BASE = 1000
SCALES = (16, 64)  # the examples ratio's goal: within 25% at these multiples of B0
CONFIG = {
    # batch multiples of B0 per task, the LR grid (powers of sqrt 2 around its centre) and how many times
    # it widens, Adam's LR at B0 (centre of B0's grid), pilot steps, probe examples, label-noise levels
    # (the dose-response, on DOSE_SCALES), fresh seeds. The quick LM, a smaller model, was best at twice
    # the full one's LR.
    True: dict(scales={"lm": (1, 4, 16, 64), "mlp": (1, 4, 16, 64, 256)}, grid=(0, 1), widen=2,
               lr={"lm": 6e-3, "mlp": 2e-3}, pilot={"lm": 80, "mlp": 150}, probe={"lm": 256, "mlp": 512},
               noise=(0.0, 0.3), fresh=3),
    # The MLP's B_crit was ~200 B0 at the full size, and label noise raises it: its multiples reach
    # 1024 B0 so that every noise level's B_crit lies inside the batches measured. The LM's (~15 B0)
    # stop at 128 B0: one run to the target at 256 B0 costs 75 s (0.6 s a step), 12 runs there 15
    # of the ~50 minutes estimated with it, for a point deep in the hyperbola's flat end.
    False: dict(scales={"lm": (1, 2, 4, 8, 16, 32, 64, 128),
                        "mlp": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)},
                grid=(-1, 0, 1), widen=2, lr={"lm": 3e-3, "mlp": 2e-3}, pilot={"lm": 400, "mlp": 1600},
                probe={"lm": 2048, "mlp": 4096}, noise=(0.0, 0.2, 0.4), fresh=5),
}
DOSE_SCALES = {True: (1, 4, 16, 64, 256), False: (1, 4, 16, 64, 256, 1024)}


@dataclass
class TaskResult:
    task: str  # "lm", "mlp", or "mlp q=0.2" (label noise)
    q: float
    b0: int
    target: float
    pilot_steps: int
    b_noise: float
    b_pre: float
    pilot_trace: list[tuple[int, float, float, float]] = field(default_factory=list)  # step, val, B_noise, B_pre
    points: list[stt.Point] = field(default_factory=list)
    s_min: float = float("nan")
    e_min: float = float("nan")
    b_crit: float = float("nan")
    b_crit_ci: tuple[float, float] = (float("nan"), float("nan"))
    rms: float = float("nan")  # the hyperbola's RMS relative residual
    ratios: dict[int, tuple[float, float, float]] = field(default_factory=dict)  # scale -> E ratio, 95% interval
    shallow: list[tuple[float, float]] = field(default_factory=list)  # (share of the pilot's gain, target)
    # per target depth: share, target, B_crit, the pilot's step there, its B_noise and B_pre there
    by_depth: list[tuple[float, float, float, float, float, float]] = field(default_factory=list)
    local_b: list[tuple[int, float]] = field(default_factory=list)  # (pilot step, B_simple at its parameters)
    b_noise_probe_start: float = float("nan")
    seconds: float = 0.0

    @property
    def fits(self) -> bool:
        return math.isfinite(self.rms) and self.rms <= stt.FIT_RMS_LIMIT

    def fitted(self) -> tuple[list[int], list[list[float]]]:
        """The batches whose fresh seeds all reached the target, and those seeds' steps."""
        ok = [p for p in self.points if p.steps is not None]
        return [p.batch for p in ok], [list(p.seed_steps) for p in ok]  # type: ignore[misc]


def local_noise_scale(task: sf.Task, model: torch.nn.Module, examples: int, gen: torch.Generator) -> float:
    batches = (task.batch(gen, PROBE_MICRO) for _ in range(examples // PROBE_MICRO))
    probe = probe_noise_scale(model, lambda m, batch: task.loss(m, *batch), batches, PROBE_MICRO)
    return probe.value if probe.value is not None else float("inf")


def pilot(task: sf.Task, label: str, q: float, lr: float, steps: int, probe_examples: int) -> TaskResult:
    noise = GradientNoiseScale(ema=PILOT_EMA)
    made: list[GradientNoiseScale] = []

    def estimators(opt: torch.optim.Optimizer) -> list[GradientNoiseScale]:
        made.append(GradientNoiseScale(ema=PILOT_EMA, preconditioner=opt))
        return [noise, made[-1]]

    local: list[tuple[int, float]] = []
    gen, at_start = torch.Generator().manual_seed(12345), []

    def probe(step: int, model: torch.nn.Module) -> None:
        if not at_start:
            at_start.append(noise.value or float("nan"))
        if probe_examples:
            local.append((step, local_noise_scale(task, model, probe_examples, gen)))

    run = stt.train(task, PILOT_SCALE * task.b0, lr * math.sqrt(PILOT_SCALE), steps,
                    seed=PILOT_SEED, noises=estimators, micro=task.b0, probe=probe, probe_from=steps - PROBE_STEPS + 1)
    torch.manual_seed(PILOT_SEED)
    initial = task.val_loss(task.make_model())
    final = min(v for _, v in run.trace[-3:])
    res = TaskResult(label, q, task.b0, initial - TARGET_FRACTION * (initial - final), steps,
                     noise.value or float("nan"), made[0].value or float("nan"),
                     [(s, v, *e) for (s, v), e in zip(run.trace, run.extra, strict=True)], local_b=local,
                     b_noise_probe_start=at_start[0] if at_start else float("nan"))
    res.shallow = [(f, initial - f * (initial - final)) for f in SHALLOW_FRACTIONS]
    print(f"  pilot: batch {PILOT_SCALE * task.b0}, {steps} steps, val {initial:.4f} -> {final:.4f}; target "
          f"{res.target:.4f}; B_noise {res.b_noise:.1f}, B_pre {res.b_pre:.1f}", flush=True)
    return res


def analyse(res: TaskResult) -> None:
    """The fit, its residual, the bootstrap intervals, the examples ratios and the shallower targets."""
    batches, seeds = res.fitted()
    if len(batches) < 3:
        return
    means = [stt.mean(s) for s in seeds]
    res.s_min, res.e_min = stt.fit_hyperbola(batches, means)
    res.b_crit = stt.b_crit_of(res.s_min, res.e_min)
    res.rms = stt.fit_rms(batches, means, res.s_min, res.e_min)
    res.b_crit_ci = stt.bootstrap_b_crit(batches, seeds)
    by_batch = dict(zip(batches, seeds, strict=True))
    for scale in SCALES:
        b = scale * res.b0
        if res.b0 in by_batch and b in by_batch:
            s0, s = by_batch[res.b0], by_batch[b]
            res.ratios[scale] = (b * stt.mean(s) / (res.b0 * stt.mean(s0)), *stt.examples_ratio_interval(res.b0, s0, b, s))
    depth = []
    for frac, target in res.shallow:
        steps = [[stt.crossing(t, target) for t in p.traces] for p in res.points if p.steps is not None]
        if any(None in s for s in steps):
            continue
        fit = stt.fit_hyperbola(batches, [stt.mean(s) for s in steps])  # type: ignore[arg-type]
        cross = next((t for t in res.pilot_trace if t[1] <= target), None)
        depth.append((frac, target, stt.b_crit_of(*fit), *((cross[0], cross[2], cross[3]) if cross else (math.nan,) * 3)))
    pilot_cross = next((t for t in res.pilot_trace if t[1] <= res.target), None)
    depth.append((TARGET_FRACTION, res.target, res.b_crit,
                  *((pilot_cross[0], pilot_cross[2], pilot_cross[3]) if pilot_cross else (math.nan,) * 3)))
    res.by_depth = depth


def benchmark_task(task: sf.Task, cfg: dict, fresh: int, label: str | None = None, q: float = 0.0,
                   scales: tuple[int, ...] | None = None) -> TaskResult:
    label = label or task.name
    scales = scales or cfg["scales"][task.name]
    t0, cpu0 = time.perf_counter(), time.process_time()
    print(f"task {label}: B0 {task.b0}, batches {[s * task.b0 for s in scales]}", flush=True)
    name = task.name
    res = pilot(task, label, q, cfg["lr"][name], cfg["pilot"][name], cfg["probe"][name] if not q else 0)
    s_p, e_p = res.pilot_steps, res.pilot_steps * PILOT_SCALE * task.b0
    for j, scale in enumerate(scales):
        batch = scale * task.b0
        # A tuned run needs at most the pilot's steps above its batch and its examples below: 2x slack.
        cap = int(2 * max(s_p, e_p / batch))
        # The grid is centred on the previous batch's choice scaled by sqrt(B): the best LR grows more
        # slowly than sqrt(B) at large batch (the LM's best at 256 B0 was 1/8 of B0's scaled by sqrt(B)
        # in an earlier run), which a grid around sqrt scaling from B0 reached only at its widened edge.
        prev = next((p for p in reversed(res.points) if p.steps is not None), None)
        centre = cfg["lr"][name] * math.sqrt(scale) if prev is None else prev.lr * math.sqrt(batch / prev.batch)
        res.points.append(stt.tune_and_measure(
            task, batch, centre, cap, res.target, tune_seeds=TUNE_SEEDS,
            fresh_seeds=[FRESH_SEED_BASE + 100 * j + i for i in range(fresh)], grid=cfg["grid"], widen=cfg["widen"],
            log=lambda m: print(m, flush=True)))
    analyse(res)
    res.seconds = time.perf_counter() - t0
    print(f"  B_crit {res.b_crit:.1f} [{res.b_crit_ci[0]:.1f}, {res.b_crit_ci[1]:.1f}], fit RMS {res.rms:.1%} "
          f"({res.seconds:.0f}s; {time.process_time() - cpu0:.0f}s CPU)", flush=True)
    return res


# ---------------------------------------------------------------- verdicts and tables


def fmt(x: float, digits: int = 1) -> str:
    return "inf" if x == math.inf else "-inf" if x == -math.inf else "-" if not math.isfinite(x) else f"{x:.{digits}f}"


def ci(lo: float, hi: float, digits: int = 1) -> str:
    return f"[{fmt(lo, digits)}, {fmt(hi, digits)}]"


def not_scored(r: TaskResult) -> str | None:
    if not math.isfinite(r.rms):
        return "not scored (too few batches reached the target)"
    return None if r.fits else f"not scored (hyperbola RMS {r.rms:.0%} > {stt.FIT_RMS_LIMIT:.0%})"


def verdict(lo: float, hi: float, band_lo: float, band_hi: float, why: str | None = None) -> str:
    """The computed verdict; 'undecided' names the band whose edge the interval straddles."""
    if why:
        return why
    v = stt.within(lo, hi, band_lo, band_hi)
    if v == "undecided":
        return f"undecided (the CI straddles the band {fmt(band_lo, 2)} to {fmt(band_hi, 2)}: more seeds)"
    return v if v == "yes" else "**no**"


def predicted_ratio(b: int, b0: int, b_noise: float) -> float:
    """McCandlish et al. 2018 eq. 2.11: E(B)/E(B0) = (1 + B/B_noise)/(1 + B0/B_noise) at the same loss."""
    return (1 + b / b_noise) / (1 + b0 / b_noise) if b_noise > 0 else float("nan")


def b_noise_ratio_ci(r: TaskResult, b: float) -> tuple[float, float]:
    lo, hi = r.b_crit_ci
    return (b / hi if hi > 0 else 0.0), (b / lo if lo > 0 else math.inf)


def at_target(r: TaskResult) -> float:
    """The pilot's B_noise where it crosses the target loss (nan where it never does)."""
    return next((bn for frac, _, _, _, bn, _ in r.by_depth if frac == TARGET_FRACTION), math.nan)


def report(results: list[TaskResult], dose: list[TaskResult]) -> str:
    lines = ["| task | batch | chosen LR | tuning grid: LR (mean steps of the tuning seeds; -: cut once slower than "
             "the best, or not reached) | fresh seeds: steps "
             "to target | mean | examples | fit S_min(1 + B_crit/B) |", "|---|---|---|---|---|---|---|---|"]
    for r in [*results, *dose[1:]]:
        for p in r.points:
            grid = ", ".join(f"{a:.3g} ({'-' if v is None else f'{v:.0f}'})" for a, v in p.grid)
            seeds = ", ".join("-" if s is None else f"{s:.0f}" for s in p.seed_steps)
            edge = " (grid edge)" if p.grid and p.lr in (p.grid[0][0], p.grid[-1][0]) else ""
            lines.append(f"| {r.task} | {p.batch} | {p.lr:.4g}{edge} | {grid} | {seeds} | "
                         f"{'not reached' if p.steps is None else f'{p.steps:.0f}'} | "
                         f"{'-' if p.steps is None else f'{p.steps * p.batch:.0f}'} | "
                         f"{fmt(r.s_min + r.e_min / p.batch, 0)} |")
    lines += ["", "| task | target val loss | S_min | B_crit (95% CI) | fit RMS error | hyperbola fits (<= 15%) | "
              "B_noise (client) | B_noise / B_crit (95% CI) | within 3x | within 2x | B_pre | B_pre / B_crit |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in [*results, *dose[1:]]:
        lo, hi = b_noise_ratio_ci(r, r.b_noise)
        why = not_scored(r)
        lines.append(f"| {r.task} | {r.target:.4f} | {fmt(r.s_min)} | {fmt(r.b_crit)} {ci(*r.b_crit_ci)} | "
                     f"{r.rms:.1%} | {'yes' if r.fits else '**no**'} | {fmt(r.b_noise)} | "
                     f"{fmt(r.b_noise / r.b_crit, 2)} {ci(lo, hi, 2)} | {verdict(lo, hi, 1 / 3, 3, why)} | "
                     f"{verdict(lo, hi, 0.5, 2, why)} | {fmt(r.b_pre)} | {fmt(r.b_pre / r.b_crit, 2)} |")
    lines += ["", "| task | scale | E(B)/E(B0) measured (95% CI) | predicted by B_noise | error | within 25% | "
              "predicted by B_pre | predicted by fitted B_crit |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for scale in SCALES:
            if scale not in r.ratios:
                lines.append(f"| {r.task} | {scale}x | not reached | - | - | undecided (not reached) | - | - |")
                continue
            m, lo, hi = r.ratios[scale]
            pred = predicted_ratio(scale * r.b0, r.b0, r.b_noise)
            # |pred/measured - 1| <= 25% <=> measured in [pred/1.25, pred/0.75]
            lines.append(f"| {r.task} | {scale}x | {m:.2f} {ci(lo, hi, 2)} | {pred:.2f} | {pred / m - 1:+.0%} | "
                         f"{verdict(lo, hi, pred / 1.25, pred / 0.75, not_scored(r))} | "
                         f"{fmt(predicted_ratio(scale * r.b0, r.b0, r.b_pre), 2)} | "
                         f"{fmt(predicted_ratio(scale * r.b0, r.b0, r.b_crit), 2)} |")
    if len(dose) > 1:
        # B_noise grows as the loss falls, and each level's target is its own pilot's 97%: read at the pilot's
        # end, the levels' B_noise sit at other depths than their B_crit; read where the pilot crosses its
        # target, at the same depth.
        lines += ["", "| label noise q | target val loss | B_crit (95% CI) | fit RMS | B_noise (pilot) | "
                  "B_crit / B_crit(q=0) measured (95% CI) | B_noise / B_noise(q=0) predicted | predicted / measured | "
                  "within 1.5x | B_noise at the target (pilot's crossing) | predicted there | predicted / measured | "
                  "within 1.5x |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        base = dose[0]
        for r in dose:
            pred = r.b_noise / base.b_noise
            there = at_target(r) / at_target(base)
            if r is base:
                lo = hi = m = 1.0
            else:
                m = r.b_crit / base.b_crit
                num, den = r.fitted(), base.fitted()
                lo, hi = stt.bootstrap_b_crit_ratio(num, den) if min(len(num[0]), len(den[0])) >= 3 else (math.nan,) * 2
            why = not_scored(r) or not_scored(base)
            lines.append(f"| {r.q:g} | {r.target:.4f} | {fmt(r.b_crit)} {ci(*r.b_crit_ci)} | {r.rms:.1%} | "
                         f"{fmt(r.b_noise)} | {m:.2f} {ci(lo, hi, 2)} | {pred:.2f} | {pred / m:.2f} | "
                         f"{'-' if r is base else verdict(lo, hi, pred / 1.5, pred * 1.5, why)} | "
                         f"{fmt(at_target(r))} | {fmt(there, 2)} | {fmt(there / m, 2)} | "
                         f"{'-' if r is base else verdict(lo, hi, there / 1.5, there * 1.5, why)} |")
    lines += ["", "| task | target: share of the pilot's gain | target val loss | B_crit (fit, fresh seeds) | "
              "pilot step at target | B_noise there | B_noise / B_crit | B_pre there | B_pre / B_crit |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for frac, target, b_crit, step, bn, bp in r.by_depth:  # type: ignore[misc]
            lines.append(f"| {r.task} | {frac:.0%} | {target:.4f} | {fmt(b_crit)} | {fmt(step, 0)} | {fmt(bn)} | "
                         f"{fmt(bn / b_crit, 2)} | {fmt(bp)} | {fmt(bp / b_crit, 2)} |")
    if any(r.local_b for r in results):
        lines += ["", "| task | pilot steps probed | B_simple at each step's parameters: min | median | mean | "
                  "harmonic mean | EMA estimate (probes start / end) | B_crit (fit) | mean / B_crit | "
                  "harmonic mean / B_crit |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            bs = sorted(b for _, b in r.local_b)
            if not bs:
                continue
            avg, harm = sum(bs) / len(bs), len(bs) / sum(1 / b for b in bs)
            lines.append(f"| {r.task} | {r.local_b[0][0]}-{r.local_b[-1][0]} | {bs[0]:.0f} | {bs[len(bs) // 2]:.0f} | "
                         f"{avg:.0f} | {harm:.0f} | {r.b_noise_probe_start:.0f} / {r.b_noise:.0f} | {fmt(r.b_crit, 0)} | "
                         f"{fmt(avg / r.b_crit, 2)} | {fmt(harm / r.b_crit, 2)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small tasks, 4-5 batch sizes, 2 LRs, 3 fresh seeds (CI)")
    parser.add_argument("--tasks", default="lm,mlp", help="lm, mlp; the dose-response runs with mlp")
    parser.add_argument("--seeds", type=int, default=None, help="fresh seeds per batch (default 5; --quick: 3)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: see scaling_fidelity.py
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = CONFIG[args.quick]
    fresh = args.seeds or cfg["fresh"]
    if fresh < 2:
        parser.error("--seeds must be >= 2 (the bootstrap resamples the fresh seeds)")
    makers = {"lm": sf.lm_task, "mlp": sf.mlp_task}
    t0, cpu0 = time.perf_counter(), time.process_time()
    results = [benchmark_task(makers[name](args.quick), cfg, fresh) for name in args.tasks.split(",")]
    dose: list[TaskResult] = []
    if "mlp" in args.tasks.split(","):
        # q = 0 is the MLP's own runs, refitted on the batches the noisier levels run at
        mlp = next(r for r in results if r.task == "mlp")
        dose.append(replace(mlp, task="mlp q=0", points=[p for p in mlp.points if p.batch // mlp.b0 in DOSE_SCALES[args.quick]],
                            ratios={}, by_depth=[], shallow=[]))
        analyse(dose[0])
        for q in cfg["noise"][1:]:
            dose.append(benchmark_task(stt.label_noise_task(sf.mlp_task(args.quick), q), cfg, fresh, f"mlp q={q:g}",
                                       q, DOSE_SCALES[args.quick]))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    table = report(results, dose)
    runs = sum(len(p.seed_steps) for r in [*results, *dose] for p in r.points)
    # CPU time beside the wall clock: on a shared machine it says what a quiet one would take.
    table += (f"\n\nElapsed {elapsed:.0f} s ({cpu:.0f} s CPU) on {torch.get_num_threads()} thread; {fresh} fresh seeds per batch "
              f"({runs} fresh runs), tuning seeds {list(TUNE_SEEDS)}.")
    (args.out / "critical_batch.md").write_text(table + "\n")
    # The fresh runs' curves stay out of the JSON (hundreds of points each); the steps are there.
    payload = [asdict(r) | {"fits": r.fits, "points": [{k: v for k, v in asdict(p).items() if k != "traces"}
                                                       | {"steps": p.steps} for p in r.points]}
               for r in [*results, *dose[1:]]]
    (args.out / "critical_batch.json").write_text(json.dumps({"results": payload, "seconds": elapsed,
                                                              "fresh_seeds": fresh}, indent=1))
    print(table)
    print(f"total {elapsed:.0f}s; wrote {args.out}/critical_batch.{{md,json}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
