"""The evidence's LR curve where the truth bends and where it does not, on landscapes with known optima.

A study is the service's loop: at each batch size in turn, the engine recommends an LR from the runs so
far, a sweep of three LRs around it (x/÷1.8) is run and logged. A run's metric is a U in log LR around
the landscape's optimum, with noise (sd 0.004 against a curvature of 0.12), as in
``tests/scaling_rules/test_learning_simulation.py``. Two landscapes:

* **bend**: the engine's own regime curve, lr*(B) = LR0 sqrt((1 + N/B0) / (1 + N/B)), N = 2048, B0 = 256;
* **power law**: lr*(B) = LR0 (B/B0)^0.3, which never bends.

At a batch size no run has seen, each study is answered four ways: the rule alone (no evidence), one
power law through the runs (``EvidenceModel.fit``), the bend the runs show by themselves
(``EvidenceModel.shown_bend()``, an F-test at 5%; the power law where it shows none), and the engine
(``recommend`` with the runs as evidence: the power law, bent at a measured critical batch where one is
known; a bend the runs show alone is only reported). The error is the answer / the true optimum - 1; the
table gives its median and worst absolute value over the seeds.

Usage: ``python benchmarks/evidence_bend.py [--seeds N]`` (default 20; about 30 s on one core).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time

from largebatch.scaling_rules import recommend
from largebatch.scaling_rules.learning import EvidenceModel, RunEvidence, explore_lrs

B0, LR0, N = 256, 2e-3, 2048.0
KAPPA, NOISE = 0.12, 0.004


def optimum(world: str, batch: float) -> float:
    if world == "bend":
        return LR0 * math.sqrt((1 + N / B0) / (1 + N / batch))
    return LR0 * (batch / B0) ** 0.3


def request(batch: int, noise: float | None) -> dict:
    ref = {"batch_size": B0, "lr": LR0, "optimizer": "lamb", "warmup_ratio": 0.01, "steps": 100_000}
    if noise is not None:
        ref["noise_scale"] = noise
    return {"model": {"params": 10_000_000}, "reference": ref, "target": {"batch_size": batch}}


def study(world: str, seed: int, batches: tuple[int, ...], noise: float | None) -> list[RunEvidence]:
    rng = random.Random(seed)
    runs: list[RunEvidence] = []
    for batch in batches:
        lr = recommend(request(batch, noise), evidence=runs).stages[0].peak_lr
        for x in explore_lrs(lr, 3, spread=1.8):
            metric = 2.0 + 0.03 * math.log2(batch / B0) + KAPPA * math.log(x / optimum(world, batch)) ** 2
            runs.append(RunEvidence(batch_size=batch, lr=x, outcome="completed", metric=metric + rng.gauss(0, NOISE),
                                    run_id=len(runs) + 1))
    return runs


SCENARIOS = (  # world, the study's batch sizes, the target, the measured critical batch (x N) or None
    ("bend", (512, 1024, 2048, 4096), 16384, None),
    ("bend", (512, 1024, 2048), 16384, None),
    ("bend", (512, 1024), 16384, 1 / 3),
    ("bend", (512, 1024), 16384, 1.0),
    ("bend", (512, 1024), 4096, 1.0),  # off the geometric midpoint of B0 and the target: averaging's price
    ("bend", (512, 1024), 16384, 3.0),
    ("power law", (512, 1024, 2048), 8192, None),
    ("power law", (512, 1024, 2048, 4096), 16384, None),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    lines = [f"Error of the answer at a batch no run has seen (answer / true optimum - 1), median and worst |error| "
             f"over {args.seeds} seeded studies", "",
             "| landscape | the study's batch sizes | target | measured critical batch | the rule alone | one power "
             "law through the runs | the bend the runs show (reported) | studies that show one | the engine |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(errors: list[float]) -> str:
        a = [abs(e) for e in errors]
        return f"{statistics.median(a):.1%} (worst {max(a):.1%})"

    for world, batches, target, factor in SCENARIOS:
        noise = None if factor is None else N * factor
        rule, line, shown, engine, bent = [], [], [], [], 0
        truth = optimum(world, target)
        for seed in range(args.seeds):
            model = EvidenceModel.from_runs(study(world, seed, batches, noise))
            rule.append(recommend(request(target, noise)).stages[0].peak_lr / truth - 1)
            line.append(model.fit.optimum(target) / truth - 1)
            bend = model.shown_bend()
            bent += bend is not None
            shown.append((bend or model.fit).optimum(target) / truth - 1)
            engine.append(recommend(request(target, noise), evidence=model).stages[0].peak_lr / truth - 1)
        measured = "-" if factor is None else f"{noise:.0f} ({factor:.2g} x the truth's)"
        lines.append(f"| {world} | {', '.join(map(str, batches))} | {target} | {measured} | {cell(rule)} | {cell(line)} | "
                     f"{cell(shown)} | {bent}/{args.seeds} | {cell(engine)} |")
    print("\n".join(lines))
    print(f"\nelapsed {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
