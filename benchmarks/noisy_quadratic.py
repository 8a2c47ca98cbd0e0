"""The critical batch on a noisy quadratic model, where it is known exactly.

The noisy quadratic model of Zhang et al. 2019: loss L(theta) = 1/2 sum_i h_i theta_i^2, curvature
h_i = 1/i, a minibatch gradient of batch B is H theta + xi/sqrt(B) with xi ~ N(0, C), C = sigma^2 H.
SGD's second moments m_i = E theta_i^2 evolve exactly as

    m_i <- (1 - lr h_i)^2 m_i + lr^2 c_i / B,      E L = 1/2 sum_i h_i m_i,

and the step that lowers E L most is lr* = |G|^2 / (G^T H G + tr(H C)/B) (McCandlish et al. 2018,
eq. 2.6), whose gain is the noiseless one divided by 1 + B_noise/B with the analytic critical batch

    B_noise = tr(H C) / G^T H G,    G^T H G = sum_i h_i^3 m_i,

which grows ~100x along a run as the sharp directions converge. So the truth is known at every step.

What is checked, each within 10%:

1. the engine (``recommend``, budget same-loss) given the reference run's B_noise trajectory predicts
   the steps that batches 4x, 16x and 64x the reference's take to reach the reference's loss (the same
   exact dynamics at the optimal LR), where one constant B_noise (the run's last) is far off;
2. the critical batch fitted from those runs, E(B) = E_min + S_min B, i.e. B_crit = E_min/S_min (the
   hyperbola of McCandlish eq. 2.11), equals the engine's constant B_eq for the trajectory;
3. the engine's batch ramp (``"batch_size": "ramp"``, same-loss) plans the steps the ramp takes to the
   target, and takes >= 30% fewer steps than the reference batch;
4. the client's streaming estimator (``GradientNoiseScale``) at points along the reference run, fed
   the H-weighted squared norms of sampled small and large batch gradients (its preconditioned form
   with P = H: tr(PC)/G^T P G is B_noise for plain SGD), recovers the analytic B_noise there; and fed
   the plain norms, the analytic B_simple = tr(C)/|G|^2;
5. the branch protocol (``job.branch_probe``'s reading, :func:`largebatch.client._probe.fit_critical_batch`,
   fed the exact expected losses) at the same points: branches at k x B (k = 1, 2, 4, 8, B ~ B_noise/4) over
   a window of equal examples (the largest branch takes one step) recover the window's own critical
   batch: steps-to-target from that point to the loss the k = 1 branch reaches, at the branches'
   batches, fitted as in 2. The analytic one-step B_noise is printed beside it: over a window that
   takes 7-16% of the loss, the window's critical batch is 5-35% above it (the sharp directions
   converge within the window, so the smaller batch's later steps gain less).

Run: ``python benchmarks/noisy_quadratic.py [--quick]`` (prints a table; exits 1 if a check fails).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np

TOLERANCE = 0.10
SIGMA2 = 10.0  # B_noise starts at ~3x the reference batch and ends ~100x past it: batches 4-64x straddle it
TARGET = 0.2  # the loss to reach, as a fraction of the start
RATIOS = (4, 16, 64, 256)


@dataclass(frozen=True)
class NQM:
    h: np.ndarray
    c: np.ndarray

    @classmethod
    def make(cls, dim: int, sigma2: float) -> NQM:
        h = 1.0 / np.arange(1, dim + 1)
        return cls(h=h, c=sigma2 * h)

    def loss(self, m: np.ndarray) -> float:
        return 0.5 * float(self.h @ m)

    def b_noise(self, m: np.ndarray) -> float:
        return float(self.h @ self.c) / float((self.h**3) @ m)

    def best_lr(self, m: np.ndarray, batch: float) -> float:
        h2m = self.h**2 * m
        return float(h2m.sum()) / (float((self.h * h2m).sum()) + float(self.h @ self.c) / batch)


def run(q: NQM, batch: float, target: float, *, record_every: int = 0,
        max_steps: int = 10_000_000) -> tuple[float, list[tuple[int, float]], list[np.ndarray]]:
    """Steps of SGD at the optimal LR to bring E L to ``target`` (exact expected dynamics, the crossing
    interpolated between steps); with
    record_every, the (step, B_noise) trajectory and the states at those steps."""
    m = np.ones_like(q.h)
    traj, states = [], []
    prev = math.inf
    for step in range(max_steps):
        if record_every and step % record_every == 0:
            traj.append((step, q.b_noise(m)))
            states.append(m.copy())
        loss = q.loss(m)
        if loss <= target:
            # the crossing, interpolated in log loss between the last two steps
            frac = 0.0 if step == 0 else math.log(prev / target) / math.log(prev / loss)
            return step - 1 + frac if step else 0.0, traj, states
        prev = loss
        lr = q.best_lr(m, batch)
        m = (1 - lr * q.h) ** 2 * m + lr**2 * q.c / batch
    raise RuntimeError(f"batch {batch}: target {target} not reached in {max_steps} steps")


def engine_steps(traj: list[tuple[int, float]], ref_batch: int, ref_steps: int, batch: int | None,
                 constant: float | None = None) -> tuple[int, float]:
    """(steps the engine plans at ``batch`` under budget same-loss, its B_eq or B_noise)."""
    from largebatch.scaling_rules import recommend

    ref = {"batch_size": ref_batch, "lr": 0.1, "optimizer": "sgd", "steps": ref_steps}
    if constant is None:
        pts = traj[:: max(1, math.ceil(len(traj) / 1024))]
        ref["noise_trajectory"] = [{"examples_seen": float(s * ref_batch), "noise_scale": b} for s, b in pts]
    else:
        ref["noise_scale"] = constant
    r = recommend({"model": {"params": 10**6, "family": "other"}, "reference": ref,
                   "target": {"batch_size": batch}, "budget": "same-loss"})
    bn = next(float(x.split(key)[1].split()[0]) for x in r.rationale for key in ("B_eq = ", "B_noise = ")
              if key in x and "critical batch" in x)
    return r.total_steps, bn


def ramp_recipe(traj: list[tuple[int, float]], ref_batch: int, ref_steps: int) -> list[tuple[int, int]]:
    """(batch, steps) of the engine's batch ramp (budget same-loss, default max_overhead) from the reference."""
    from largebatch.scaling_rules import recommend

    pts = traj[:: max(1, math.ceil(len(traj) / 1024))]
    ref = {"batch_size": ref_batch, "lr": 0.1, "optimizer": "sgd", "steps": ref_steps,
           "noise_trajectory": [{"examples_seen": float(s * ref_batch), "noise_scale": b} for s, b in pts]}
    r = recommend({"model": {"params": 10**6, "family": "other"}, "reference": ref,
                   "target": {"batch_size": "ramp"}, "budget": "same-loss"})
    return [(st.batch_size, st.steps) for st in r.stages]


def run_schedule(q: NQM, stages: list[tuple[int, int]], target: float) -> tuple[float, float]:
    """(steps, examples) to bring E L to ``target`` following the (batch, steps) stages at the optimal LR,
    staying at the last batch if the stages end first."""
    m = np.ones_like(q.h)
    steps = examples = 0.0
    prev = math.inf
    plan = [b for b, n in stages for _ in range(n)]
    while True:
        loss = q.loss(m)
        if loss <= target:
            frac = 0.0 if steps == 0 else math.log(prev / target) / math.log(prev / loss)
            batch = plan[int(steps) - 1] if steps <= len(plan) else stages[-1][0]
            return steps - 1 + frac, examples - (1 - frac) * batch
        batch = plan[int(steps)] if steps < len(plan) else stages[-1][0]
        lr = q.best_lr(m, batch)
        m = (1 - lr * q.h) ** 2 * m + lr**2 * q.c / batch
        prev, steps, examples = loss, steps + 1, examples + batch


def streaming_estimate(q: NQM, m: np.ndarray, rng: np.random.Generator, *, small: int, n_micro: int,
                       updates: int, ema: float) -> tuple[float, float, float, float]:
    """(estimated B_noise, analytic, estimated B_simple, analytic) at one sampled theta ~ N(0, m)."""
    from largebatch.client.optim.noise_scale import GradientNoiseScale

    theta = rng.standard_normal(q.h.size) * np.sqrt(m)
    grad = q.h * theta
    weighted, plain = GradientNoiseScale(ema=ema), GradientNoiseScale(ema=ema)
    scale = np.sqrt(q.c / small)
    for start in range(0, updates, 1000):
        micro = grad + rng.standard_normal((min(1000, updates - start), n_micro, q.h.size)) * scale
        big = micro.mean(axis=1)
        norms = ((q.h * micro[:, 0] ** 2).sum(1), (q.h * big**2).sum(1), (micro[:, 0] ** 2).sum(1),
                 (big**2).sum(1))
        for ws, wb, ps, pb in zip(*(n.tolist() for n in norms), strict=True):
            weighted.update(ws, wb, small, small * n_micro)
            plain.update(ps, pb, small, small * n_micro)
    exact_noise = float(q.h @ q.c) / float(q.h @ grad**2)
    exact_simple = float(q.c.sum()) / float(grad @ grad)
    return weighted.value, exact_noise, plain.value, exact_simple  # type: ignore[return-value]


def _sgd(q: NQM, m: np.ndarray, batch: float) -> np.ndarray:
    lr = q.best_lr(m, batch)
    return (1 - lr * q.h) ** 2 * m + lr**2 * q.c / batch


def _steps_to(q: NQM, m: np.ndarray, batch: float, target: float) -> float:
    """Steps from ``m`` to E L = ``target`` at ``batch`` (interpolated, as in :func:`run`)."""
    prev, s = q.loss(m), 0
    while True:
        m, s = _sgd(q, m, batch), s + 1
        loss = q.loss(m)
        if loss <= target:
            return s - 1 + math.log(prev / target) / math.log(prev / loss)
        prev = loss


def branch_protocol(q: NQM, m0: np.ndarray, ks: tuple[int, ...] = (1, 2, 4, 8)) -> dict[str, float]:
    """The branch probe's reading (the client's own fit, on exact expected losses) at state ``m0``, the
    window's own steps-to-target critical batch and the analytic B_noise there."""
    from largebatch.client._probe import curve_steps, fit_critical_batch

    b_noise = q.b_noise(m0)
    batch = 2.0 ** round(math.log2(b_noise / 4))
    steps = max(ks)  # the largest branch takes one step: the shortest window the protocol allows
    kmin, points = min(ks), curve_steps(max(ks), ks)
    curve, m, done = [], m0, 0
    for n in points:
        for _ in range(n - done):
            m = _sgd(q, m, kmin * batch)
        curve.append((n, q.loss(m0) - q.loss(m), 0.0))
        done = n
    gains = []
    for k in ks:
        m = m0
        for _ in range(steps // k):
            m = _sgd(q, m, k * batch)
        gains.append(q.loss(m0) - q.loss(m))
    # exact expectations: no sampling error (a tiny one keeps the fit's redraws defined)
    fit, _, _, _ = fit_critical_batch(batch, ks, steps, [(n, g, g * 1e-9) for n, g, _ in curve], gains,
                                      [g * 1e-9 for g in gains])
    batches = np.array([k * batch for k in ks])
    final = q.loss(m0) - curve[-1][1]
    examples = np.array([_steps_to(q, m0, b, final) * b for b in batches])
    s_min, e_min = np.polyfit(batches, examples, 1, w=1 / examples)
    return {"batch": batch, "b_noise": b_noise, "window": e_min / s_min, "fit": math.nan if fit is None else fit,
            "drop": curve[-1][1] / q.loss(m0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller model and fewer estimator updates (< 60 s)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    dim, updates = (300, 15_000) if args.quick else (1000, 100_000)
    q = NQM.make(dim, sigma2=SIGMA2)
    ref_batch = 4
    target = TARGET * q.loss(np.ones(dim))
    crossing, traj, states = run(q, ref_batch, target, record_every=1)
    ref_steps = math.ceil(crossing)
    fails: list[str] = []
    print(f"noisy quadratic model: dim {dim}, h_i = 1/i, C = {SIGMA2:g} H; target E L = {target:.4g} "
          f"({TARGET:.0%} of the start); "
          f"reference batch {ref_batch}: {ref_steps} steps, B_noise {traj[0][1]:.4g} -> {traj[-1][1]:.4g}")
    print("\n| batch | measured steps | engine, trajectory | error | engine, last B_noise | error |")
    print("|---:|---:|---:|---:|---:|---:|")
    batches, examples = [ref_batch], [crossing * ref_batch]
    b_eq = None
    for k in RATIOS:
        batch = k * ref_batch
        steps = run(q, batch, target)[0]
        pred, b_eq = engine_steps(traj, ref_batch, ref_steps, batch)
        const, _ = engine_steps(traj, ref_batch, ref_steps, batch, constant=traj[-1][1])
        err, err_c = pred / steps - 1, const / steps - 1
        print(f"| {batch} | {steps:.1f} | {pred} | {err:+.1%} | {const} | {err_c:+.1%} |")
        batches.append(batch)
        examples.append(steps * batch)
        if abs(err) > TOLERANCE:
            fails.append(f"engine steps at {batch}: {err:+.1%}")
    # relative errors: each run counts alike, not the largest batch's examples most
    s_min, e_min = np.polyfit(np.array(batches, float), np.array(examples, float), 1, w=1 / np.array(examples))
    b_fit = e_min / s_min
    assert b_eq is not None
    err = b_eq / b_fit - 1
    print(f"\ncritical batch fitted from the runs (E = E_min + S_min B, McCandlish eq. 2.11): {b_fit:.4g}; the "
          f"engine's B_eq for the trajectory: {b_eq:.4g} ({err:+.1%})")
    if abs(err) > TOLERANCE:
        fails.append(f"fitted critical batch vs B_eq: {err:+.1%}")

    stages = ramp_recipe(traj, ref_batch, ref_steps)
    planned = sum(n for _, n in stages)
    steps, used = run_schedule(q, stages, target)
    err = planned / steps - 1
    saved = 1 - steps / crossing
    print(f"\nbatch ramp (engine, same-loss, max_overhead 0.2): {' -> '.join(str(b) for b, _ in stages)}; planned "
          f"{planned} steps, measured {steps:.1f} to the target ({err:+.1%}); {saved:.0%} fewer steps than the "
          f"reference batch {ref_batch} ({crossing:.1f}) at {used / (crossing * ref_batch):.3g}x its examples")
    if abs(err) > TOLERANCE:
        fails.append(f"ramp steps: {err:+.1%}")
    if saved < 0.3:
        fails.append(f"the ramp saves {saved:.0%} of the steps (< 30%)")

    rng = np.random.default_rng(args.seed)
    print("\n| step | analytic B_noise | streaming (P = H) | error | analytic B_simple | streaming (plain) | error |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for frac in (0.1, 0.5, 0.9):
        step = int(frac * ref_steps)
        m = states[step]
        small = max(1, round(q.b_noise(m)))  # where the two norms resolve |G|^2 and tr(C) alike
        est, exact, est_s, exact_s = streaming_estimate(q, m, rng, small=small, n_micro=4, updates=updates,
                                                        ema=1 - 1 / updates)
        e1, e2 = est / exact - 1, est_s / exact_s - 1
        print(f"| {step} | {exact:.4g} | {est:.4g} | {e1:+.1%} | {exact_s:.4g} | {est_s:.4g} | {e2:+.1%} |")
        for name, e in (("B_noise", e1), ("B_simple", e2)):
            if abs(e) > TOLERANCE:
                fails.append(f"streaming {name} at step {step}: {e:+.1%}")
    print("\n| step | B | window's loss drop | analytic B_noise | window's critical batch (steps-to-target) | "
          "branch probe (client) | vs analytic | vs window |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for frac in (0.1, 0.5, 0.9):
        step = int(frac * ref_steps)
        b = branch_protocol(q, states[step])
        print(f"| {step} | {b['batch']:.0f} | {b['drop']:.0%} | {b['b_noise']:.4g} | {b['window']:.4g} | "
              f"{b['fit']:.4g} | {b['fit'] / b['b_noise'] - 1:+.1%} | {b['fit'] / b['window'] - 1:+.1%} |")
        err = b["fit"] / b["window"] - 1
        if not abs(err) <= TOLERANCE:
            fails.append(f"branch probe at step {step}: {err:+.1%} from the window's critical batch")
    print(f"\n{'PASS' if not fails else 'FAIL: ' + '; '.join(fails)} (tolerance {TOLERANCE:.0%}; "
          f"{time.perf_counter() - t0:.1f} s)")
    return 1 if fails else 0


if __name__ == "__main__":
    raise SystemExit(main())
