"""What a warmup costs a short run: LAMB at the sqrt-scaled LR on the fidelity benchmark's two tasks.

``scaling_fidelity.py`` finds the empty store's recipe behind LAMB-sqrt at 64x (and undecided at 16x)
with the same LR: the two differ only in the warmup, LAMB Table 4's linear-epoch rule (the reference's
32 warmup steps kept as the run shrinks to 400 and 100 steps) against the reference's ratio (0.005 of
the run: 2 steps at 16x, none at 64x). This script sweeps the warmup alone, at those scales, with
everything else held: the reference's LR (the full fidelity run's tuned LAMB LR, 2026-12-07) times
sqrt(k), the same examples, linear decay to 0, the same data order and initialisation per seed. Each
warmup is paired by seed against 1 step, and the paired relative difference in final validation loss is
given with its two-sided 95% t interval (``scaling_rules.stats``), on seeds 2, 3, ... (the fidelity
benchmark's held-out numbering). Also written: the JSON of every run.

It asks one question: how much warmup does a short run need, and what does the warmup the rule keeps
cost? A warmup that the rule carries over from a long reference run, where it is 0.5% of the steps,
is a third of a 100-step run.

Usage: ``python benchmarks/warmup_cost.py [--quick] [--tasks lm,mlp] [--seeds N] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import scaling_fidelity as sf

from largebatch.scaling_rules import recommend, stats

# The full fidelity run's tuned LAMB reference LRs at B0 (README, "Scaling fidelity", 2026-12-07).
REFERENCE_LR = {"lm": 0.007906, "mlp": 0.006}
REFERENCE_WARMUP = 0.005  # the fidelity benchmark's reference warmup ratio
SCALES = (16, 64)
# steps (the engine's least is 1); the rules' own warmups at each scale join them
WARMUPS = (0, 1, 2, 4, 8, 16, 32)
FIRST_SEED = 2
QUICK = dict(scales=(64,), warmups=(0, 1, 4), seeds=2)


def task_of(name: str, quick: bool) -> sf.Task:
    task = sf.lm_task(quick, val_rows=(sf.LM_VAL_TOKENS_QUICK if quick else sf.LM_VAL_TOKENS) // (16 if quick else 32)) \
        if name == "lm" else sf.mlp_task(quick)
    return sf._steps_64x(task, quick)


def rule_warmups(task: sf.Task, scale: int, steps: int) -> dict[str, int]:
    """The warmup steps the engine's empty-store recipe and LAMB-sqrt give at this scale."""
    params = sum(p.numel() for p in task.make_model().parameters())
    recipe = recommend({"model": {"params": params, "family": "transformer" if task.name == "lm" else "other"},
                        "reference": {"batch_size": task.b0, "lr": REFERENCE_LR[task.name], "optimizer": "lamb",
                                      "warmup_ratio": REFERENCE_WARMUP, "steps": task.examples // task.b0},
                        "target": {"batch_size": task.b0 * scale}})
    assert recipe.total_steps == steps
    return {"the engine's rule (linear-epoch)": recipe.stages[0].warmup_steps,
            "LAMB-sqrt (the reference's ratio)": math.floor(REFERENCE_WARMUP * steps + 1e-9)}


def sweep(task: sf.Task, plan: dict[int, list[int]], seeds: list[int]) -> list[dict]:
    """Every warmup of ``plan[scale]`` at every seed, the seeds outermost."""
    rows = []
    for scale, warmups in plan.items():
        batch = task.b0 * scale
        steps = task.examples // batch
        lr = REFERENCE_LR[task.name] * math.sqrt(scale)
        for seed in seeds:
            for w in warmups:
                recipe = sf.manual_recipe("lamb", lr, batch, steps, w / steps)
                assert recipe.stages[0].warmup_steps == w
                t0 = time.perf_counter()
                val, diverged, _, _ = sf.train(task, recipe, seed=seed)
                rows.append({"task": task.name, "scale": scale, "batch": batch, "steps": steps, "lr": lr, "warmup": w,
                             "seed": seed, "val_loss": val, "diverged": diverged})
                print(f"  {task.name} {scale}x seed {seed} warmup {w:>3} of {steps}: val {val:.4f} "
                      f"({time.perf_counter() - t0:.1f}s)", flush=True)
    return rows


def report(rows: list[dict], notes: dict[tuple[str, int], dict[str, int]]) -> str:
    lines = ["| task | scale | steps | warmup steps | share of the run | mean val loss | vs 1 step [95% CI] | "
             "where the rules sit |", "|---|---|---|---|---|---|---|---|"]
    for (task, scale), marks in notes.items():
        mine = [r for r in rows if r["task"] == task and r["scale"] == scale]
        base = {r["seed"]: r["val_loss"] for r in mine if r["warmup"] == 1}
        for w in sorted({r["warmup"] for r in mine}):
            at = {r["seed"]: r["val_loss"] for r in mine if r["warmup"] == w}
            d = [at[s] / base[s] - 1 for s in sorted(at) if s in base and math.isfinite(at[s]) and math.isfinite(base[s])]
            if w == 1 or len(d) < 2:
                cell = "-"
            else:
                half = stats.t_quantile(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
                m = statistics.fmean(d)
                cell = f"{m:+.2%} [{m - half:+.2%}, {m + half:+.2%}]"
            where = ", ".join(name for name, steps in marks.items() if steps == w)
            steps = mine[0]["steps"]
            lines.append(f"| {task} | {scale}x | {steps} | {w} | {w / steps:.1%} | "
                         f"{statistics.fmean(at.values()):.4f} | {cell} | {where} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small MLP at 64x, 3 warmups, 2 seeds (CI)")
    parser.add_argument("--tasks", default="lm,mlp")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per warmup (default 8; --quick: 2)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: see scaling_fidelity.py
    scales, warmups = (QUICK["scales"], QUICK["warmups"]) if args.quick else (SCALES, WARMUPS)
    n = args.seeds or (QUICK["seeds"] if args.quick else 8)
    if n < 2:
        parser.error("--seeds must be >= 2 (the interval needs two paired differences)")
    seeds = list(range(FIRST_SEED, FIRST_SEED + n))
    tasks = ["mlp"] if args.quick else args.tasks.split(",")
    t0, rows, notes = time.perf_counter(), [], {}
    for name in tasks:
        task = task_of(name, args.quick)
        plan = {}
        for scale in scales:
            notes[(name, scale)] = marks = rule_warmups(task, scale, task.examples // (task.b0 * scale))
            plan[scale] = sorted({*warmups, *marks.values()})
        rows += sweep(task, plan, seeds)
    table = report(rows, notes)
    table += (f"\n\n{len(rows)} runs, seeds {seeds[0]}..{seeds[-1]}, {time.perf_counter() - t0:.0f} s on one thread"
              f"{' (quick: the small MLP; not a measurement)' if args.quick else ''}.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "warmup_cost.md").write_text(table + "\n")
    (args.out / "warmup_cost.json").write_text(json.dumps(rows, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
