"""A study's critical batch along the examples seen: its runs' noise trajectories, pooled and fitted.

B_noise grows over a run about as a power of the examples seen (McCandlish et al. 2018, Fig. 4; ~10x
over an LM run), so the fit is a power law, B_noise(x) = c x^b, by least squares in log-log over
every run's trajectory points (each point one log-spaced bin of examples seen, so each stretch of a
run weighs the same). Its band is a 95% confidence band of the fitted curve: with 5 runs or more a
bootstrap over runs (a run's points are correlated, runs are not); below that, the t-interval of the
regression over the points, which treats a run's smoothed points as independent and so is optimistic
(the answer says which one it gave). The curve is scaled by the study's calibration factor: the geometric
mean, over the critical batches measured by branching (``job.branch_probe``, ``lb_critical_batches``;
the study's newest :data:`MAX_MEASURED`), of measured B_crit / the streaming statistic at that point (the
B_noise the job sent with the measurement, else the uncalibrated fitted curve at its examples seen), with
a 95% t-interval in log from 2 measurements on; 1.0 until there is one.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import ValidationError

from largebatch.scaling_rules.models import NoisePoint, Reference
from largebatch.scaling_rules.stats import t_quantile
from largebatch.scaling_rules.wire import (
    CriticalBatchCalibration,
    CriticalBatchFit,
    CriticalBatchOut,
    CriticalBatchPoint,
    MeasuredCriticalBatch,
    PooledNoisePoint,
)
from largebatch.service.storage import StudyStore
from largebatch.service.storage.records import RunTrajectory
from largebatch.service.storage.trajectory import bucket_of

__all__ = ["BOOTSTRAP_RUNS", "MAX_MEASURED", "CriticalBatchOut", "calibrate", "critical_batch", "fit_power_law",
           "reference_trajectory"]

CURVE_POINTS = 32  # the fitted curve, log-spaced over the examples the runs covered (never beyond)
MAX_RUNS = 64  # the newest runs with a trajectory that one answer pools
MAX_MEASURED = 256  # the newest measured critical batches that one calibration takes
BOOTSTRAP_RUNS = 5  # fewer runs: too few distinct resamples for a bootstrap over runs (the wire's text says 5)
BOOTSTRAP_RESAMPLES = 400
_SEED = 0  # the bootstrap is seeded: the same data always answers the same band


def _line(stats: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intercept, slope and the spread of u from sums [n, Su, Sy, Suu, Suy] (rows or one)."""
    n, su, sy, suu, suy = (stats[..., i] for i in range(5))
    sxx = suu - su * su / n
    slope = (suy - su * sy / n) / np.where(sxx > 0, sxx, np.nan)
    return sy / n - slope * su / n, slope, sxx


def fit_power_law(runs: list[list[tuple[float, float]]], *, factor: float = 1.0) -> CriticalBatchFit | str:
    """Fit B = c x^b to every run's ``(examples_seen, noise_scale)`` points; a reason string when the
    points cannot determine it."""
    per_run = []
    for pts in runs:
        u = np.log([x for x, _ in pts if x >= 1])
        y = np.log([b for x, b in pts if x >= 1])
        if len(u):
            per_run.append((u, y))
    if not per_run:
        return "no point past the first example"
    u = np.concatenate([p[0] for p in per_run])
    y = np.concatenate([p[1] for p in per_run])
    n = len(u)
    if n < 3 or float(np.ptp(u)) <= 0:
        return f"{n} point(s) over {math.exp(float(u.min())):.4g}..{math.exp(float(u.max())):.4g} examples: " \
               "a power law needs 3 points at 2 or more distinct examples seen"
    stats = np.array([[len(a), a.sum(), b.sum(), (a * a).sum(), (a * b).sum()] for a, b in per_run])
    a0, b0, sxx = (float(v) for v in _line(stats.sum(axis=0)))
    resid = y - (a0 + b0 * u)
    grid = np.linspace(float(u.min()), float(u.max()), CURVE_POINTS)
    alpha = (1 - CriticalBatchFit.model_fields["confidence"].default) / 2
    if len(per_run) >= BOOTSTRAP_RUNS:
        rng = np.random.default_rng(_SEED)
        counts = rng.multinomial(len(per_run), np.full(len(per_run), 1 / len(per_run)), size=BOOTSTRAP_RESAMPLES)
        a_s, b_s, _ = _line(counts @ stats)
        ok = np.isfinite(b_s)
        curves = a_s[ok, None] + b_s[ok, None] * grid[None, :]
        lo, hi = np.quantile(curves, [alpha, 1 - alpha], axis=0)
        b_lo, b_hi = np.quantile(b_s[ok], [alpha, 1 - alpha])
        interval = "run_bootstrap"
    else:
        t = t_quantile(1 - alpha, n - 2)
        s = math.sqrt(float(resid @ resid) / (n - 2))
        half = t * s * np.sqrt(1 / n + (grid - u.mean()) ** 2 / sxx)
        lo, hi = a0 + b0 * grid - half, a0 + b0 * grid + half
        b_lo, b_hi = b0 - t * s / math.sqrt(sxx), b0 + t * s / math.sqrt(sxx)
        interval = "t_points"
    mid = a0 + b0 * grid
    points = [CriticalBatchPoint(examples_seen=float(math.exp(g)), noise_scale=factor * math.exp(m),
                         noise_scale_low=factor * math.exp(min(lw, m)), noise_scale_high=factor * math.exp(max(h, m)))
              for g, m, lw, h in zip(grid, mid, lo, hi, strict=True)]
    return CriticalBatchFit(coefficient=math.exp(a0), exponent=b0, exponent_low=float(b_lo), exponent_high=float(b_hi),
                       interval=interval, residual_rms=float(np.sqrt(np.mean(resid ** 2))), points=points)


def _pooled(trajectories: list[RunTrajectory]) -> list[PooledNoisePoint]:
    bins: dict[int, list] = {}
    for run in trajectories:
        for p in run.points:
            bins.setdefault(bucket_of(p.examples_seen), []).append(p)
    out = []
    for b in sorted(bins):
        ps = bins[b]
        tokens = [p.tokens_seen for p in ps]
        out.append(PooledNoisePoint(
            examples_seen=sum(p.examples_seen for p in ps) / len(ps),
            tokens_seen=None if None in tokens else sum(tokens) / len(ps),  # type: ignore[arg-type]
            noise_scale=math.exp(sum(math.log(p.noise_scale) for p in ps) / len(ps)),
            runs=len(ps), reports=sum(p.reports for p in ps)))
    return out


def calibrate(measured: list[MeasuredCriticalBatch], total: int, fit: CriticalBatchFit | None
              ) -> CriticalBatchCalibration:
    """The calibration factor from the measured critical batches (module docstring); ``fit`` uncalibrated."""
    logs, sent, fitted = [], 0, 0
    for m in measured:
        if m.noise_scale is not None:
            ref, sent = m.noise_scale, sent + 1
        elif fit is not None:
            ref, fitted = fit.coefficient * m.examples_seen ** fit.exponent, fitted + 1
        else:
            continue
        logs.append(math.log(m.critical_batch / ref))
    if not logs:
        if not measured:
            return CriticalBatchCalibration(detail=(
                "no measured critical batch in this study yet: the factor is 1.0. Branch probes' measured critical "
                "batches (job.branch_probe sends them) set it to the geometric mean of measured B_crit / streaming "
                "B_noise at their point."))
        return CriticalBatchCalibration(detail=(
            f"{len(measured)} measured critical batch(es), none with the job's streaming B_noise and no fitted "
            "curve to compare them with: the factor is 1.0"))
    n, mean = len(logs), math.fsum(logs) / len(logs)
    out = CriticalBatchCalibration(factor=math.exp(mean), measured=n, detail=(
        f"geometric mean of measured B_crit / streaming B_noise over {n} measured critical batch(es) (the newest "
        f"{len(measured)} of {total}): {sent} against the B_noise the job sent with it, {fitted} against the fitted "
        f"curve at its examples seen" + (f", {len(measured) - n} without either left out" if len(measured) > n else "")))
    if n >= 2:
        sd = math.sqrt(math.fsum((x - mean) ** 2 for x in logs) / (n - 1))
        half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
        out.factor_low, out.factor_high, out.geometric_sd = math.exp(mean - half), math.exp(mean + half), math.exp(sd)
        out.detail += "; factor_low..factor_high: 95% t-interval of the mean log ratio"
    return out


def critical_batch(store: StudyStore, namespace: str, study: str) -> CriticalBatchOut:
    """The study's fitted critical batch along the examples seen, calibrated by its measured critical batches,
    and the pooled points behind it.

    Raises NotFound (no such study in ``namespace``)."""
    total, trajectories = store.noise_trajectories(namespace, study, max_runs=MAX_RUNS)
    n_measured, measured = store.measured_critical_batches(namespace, study, limit=MAX_MEASURED)
    pooled = _pooled(trajectories)
    fit = fit_power_law([[(p.examples_seen, p.noise_scale) for p in run.points] for run in trajectories]) \
        if trajectories else None
    calibration = calibrate(measured, n_measured, fit if isinstance(fit, CriticalBatchFit) else None)
    out = CriticalBatchOut(study=study, runs=len(trajectories), runs_with_trajectory=total,
                           calibration=calibration, points=pooled)
    if fit is None:
        out.reason = ("no run of this study has reported a noise trajectory yet (reports with noise_scale "
                      "and examples_seen; job.measure_noise sends them)")
        return out
    if isinstance(fit, str):
        out.reason = fit
        return out
    for c in fit.points:
        c.noise_scale, c.noise_scale_low, c.noise_scale_high = (calibration.factor * v for v in (
            c.noise_scale, c.noise_scale_low, c.noise_scale_high))
    if pooled and all(p.tokens_seen is not None for p in pooled):
        per_example = sum(p.tokens_seen for p in pooled) / sum(p.examples_seen for p in pooled)  # type: ignore[misc]
        for c in fit.points:
            c.tokens_seen = c.examples_seen * per_example
    out.fit = fit
    return out


def reference_trajectory(out: CriticalBatchOut, ref: Reference) -> tuple[list[NoisePoint] | None, str]:
    """The study's calibrated curve as ``ref.noise_trajectory`` (None when it cannot be one), and what fed it.

    The curve is in the runs' examples. Where the runs also counted tokens and the reference has a seq_len,
    it goes over in tokens (B_noise is per token, so a reference with other sequences reads it in its own);
    otherwise the reference's sequences are taken to be the runs'."""
    cal = out.calibration
    if out.fit is None:
        return None, f"no fitted critical batch curve: {out.reason}"
    fit = out.fit
    measured = f"from {cal.measured} measured critical batch(es)" if cal.measured else "no measured critical batch"
    what = (f"the study's critical batch along the run, B_noise = {fit.coefficient:.4g} x examples^{fit.exponent:.3g} "
            f"fitted over {out.runs} run(s)' trajectories (of {out.runs_with_trajectory} with one), x calibration "
            f"factor {cal.factor:.3g} ({measured})")
    per_example = None
    if ref.seq_len is not None and all(p.tokens_seen is not None for p in fit.points):
        per_example = fit.points[0].tokens_seen / fit.points[0].examples_seen  # type: ignore[operator]
    elif ref.batch_size is None:
        return None, f"{what}; not used: the reference gives neither batch_size nor seq_len to read it in"
    to_ref = 1.0 if per_example is None else per_example / ref.seq_len  # type: ignore[operator]
    points: list[NoisePoint] = []
    try:
        for p in fit.points:
            seen = p.examples_seen if per_example is None else p.tokens_seen
            if points and seen <= points[-1].seen:  # type: ignore[operator]
                continue  # a band that narrow in log collapses points: the engine takes strictly increasing ones
            points.append(NoisePoint(**{"examples_seen" if per_example is None else "tokens_seen": seen},
                                     noise_scale=p.noise_scale * to_ref, noise_scale_low=p.noise_scale_low * to_ref))
    except ValidationError as e:
        return None, f"{what}; not used: outside the engine's range ({e.errors()[0]['msg']})"
    unit = "examples" if per_example is None else "tokens" + (
        f" (B_noise x {to_ref:.4g}: per token, in the reference's sequences)" if to_ref != 1 else "")
    return points, (f"{what}: given to the engine as reference.noise_trajectory, {len(points)} points over "
                    f"{points[0].seen:.4g}..{points[-1].seen:.4g} {unit}, noise_scale_low the band's lower end")
