"""The critical batch along the run: what a growing B_noise costs a batch, and when a ramp doubles it.

McCandlish et al. 2018, eq. 2.11: at a fixed B_noise, reaching a loss at batch B takes
E = E_min (1 + B/B_noise) examples. B_noise grows as the loss falls, so the equation holds per unit of
progress: with eps the minimal examples (those of a batch -> 0), dE = (1 + B/B_noise(eps)) d eps.
Progress is read on the reference run, at batch B_ref, whose examples x satisfy
dx = (1 + B_ref/B_noise(x)) d eps, so the examples the batch B needs for the reference's [x0, x1] are

    E_B = integral_x0^x1 (1 + B/B_noise(x)) / (1 + B_ref/B_noise(x)) dx
        = (x1 - x0) + (B - B_ref) integral_x0^x1 dx / (B_noise(x) + B_ref).

That is the constant-B_noise ratio with B_noise replaced by one number, the same for every B:

    B_eq + B_ref = (x1 - x0) / integral_x0^x1 dx / (B_noise(x) + B_ref),

a harmonic mean of B_noise + B_ref over the reference's examples. Early, small B_noise weighs most:
a bigger batch pays where the critical batch is still small, so B_eq sits well below the last (largest)
value a store keeps. The overhead over the run E(B)/E_min - 1 is exactly B/B_eq (same integral), so
batch "auto" at max_overhead x B_eq accepts that overhead. B_noise is linear in x between the points
and held at the end values beyond them; the integral of each linear piece is closed-form (a
logarithm), so the result is exact and continuous in every point.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from . import priors
from .models import NoisePoint, Reference

__all__ = ["Trajectory", "prior_trajectory", "ramp_batches"]

PRIOR_POINTS = 64  # log-spaced over the run, from 1/1024 of it


def prior_trajectory(ref: Reference, tokens: float) -> list[NoisePoint]:
    """A growing batch prior read along the run, Step Law's loss-optimal B_opt(D)
    (:func:`.priors.step_law_batch_tokens`, unscaled: the scaled prior describes how the LR moves, not
    where examples start to cost): after a fraction f of the reference run, f x ``tokens`` tokens have been seen, and
    B_noise is the prior at that many tokens, in the reference's sequences. A growing prior, not a
    measurement: it lets batch "ramp" plan without one."""
    assert ref.steps is not None and ref.batch_size is not None and ref.seq_len is not None
    run = float(ref.steps * ref.batch_size)
    out = []
    for i in range(PRIOR_POINTS):
        f = 1024.0 ** (i / (PRIOR_POINTS - 1) - 1)
        out.append(NoisePoint(examples_seen=f * run,
                              noise_scale=priors.step_law_batch_tokens(f * tokens) / ref.seq_len))
    return out


@dataclass(frozen=True)
class Trajectory:
    """B_noise (and its lower bound) against the reference run's examples, in the reference's units."""

    seen: tuple[float, ...]  # reference examples (sequences)
    noise: tuple[float, ...]
    low: tuple[float, ...]
    end: float  # the reference run's examples: ref.steps x ref.batch_size, else the last point

    @classmethod
    def of(cls, ref: Reference) -> Trajectory | None:
        pts = ref.noise_trajectory
        if pts is None:
            return None
        per = 1.0 if pts[0].examples_seen is not None else 1.0 / ref.seq_len  # type: ignore[operator]
        seen = tuple(p.seen * per for p in pts)
        end = ref.steps * ref.batch_size if (ref.steps and ref.batch_size) else seen[-1]
        return cls(seen=seen, noise=tuple(p.noise_scale for p in pts),
                   low=tuple(p.noise_scale if p.noise_scale_low is None else p.noise_scale_low for p in pts),
                   end=float(end) if end > 0 else 1.0)

    def at(self, x: float, *, low: bool = False) -> float:
        """B_noise (or its lower bound) at reference examples x: linear between points, held beyond."""
        ys = self.low if low else self.noise
        xs = self.seen
        if x <= xs[0]:
            return ys[0]
        if x >= xs[-1]:
            return ys[-1]
        i = _bisect(xs, x)
        t = (x - xs[i]) / (xs[i + 1] - xs[i])
        return ys[i] + t * (ys[i + 1] - ys[i])

    def equivalent(self, ref_batch: float, lo: float = 0.0, hi: float | None = None) -> float:
        """B_eq over the reference's examples [lo, hi] (default the whole run): the constant B_noise
        with the same examples cost at every batch (module docstring)."""
        hi = self.end if hi is None else hi
        if hi <= lo:
            return self.at(lo)
        knots = [lo] + [x for x in self.seen if lo < x < hi] + [hi]
        total = 0.0
        for a, b in itertools.pairwise(knots):
            total += (b - a) * _inv_mean(self.at(a) + ref_batch, self.at(b) + ref_batch)
        return max((hi - lo) / total - ref_batch, 1e-300)

    def summary(self) -> str:
        return (f"{len(self.seen)} point(s), B_noise {min(self.noise):.4g}..{max(self.noise):.4g} over "
                f"{self.seen[0]:.4g}..{self.seen[-1]:.4g} reference examples")


def _bisect(xs: tuple[float, ...], x: float) -> int:
    lo, hi = 0, len(xs) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if xs[mid] <= x:
            lo = mid
        else:
            hi = mid
    return lo


def _inv_mean(u: float, v: float) -> float:
    """Mean of 1/y over a linear piece from u to v: ln(v/u)/(v - u), its limit 1/u as v -> u."""
    d = (v - u) / u
    if abs(d) < 1e-9:
        return (1 - d / 2) / u
    return math.log1p(d) / (v - u)


def ramp_batches(traj: Trajectory, start: float, top: float, overhead: float) -> list[tuple[float, float, float]]:
    """(batch, first, last reference example) of each stage of a batch ramp: from ``start``, the batch
    doubles where the critical batch's lower bound, overhead x B_noise_low(x), reaches twice the batch,
    and stops at ``top``. Between points the bound is linear, so each crossing is solved exactly."""
    stages: list[tuple[float, float, float]] = []
    batch, x = float(start), 0.0
    while True:
        nxt = _first_crossing(traj, 2 * batch / overhead, x) if 2 * batch <= top else None
        if nxt is None or nxt >= traj.end:
            stages.append((batch, x, traj.end))
            return stages
        if nxt > x:
            stages.append((batch, x, nxt))
        batch, x = 2 * batch, nxt


def _first_crossing(traj: Trajectory, level: float, after: float) -> float | None:
    """The first reference example >= after where the lower bound reaches level (None: never)."""
    if traj.at(after, low=True) >= level:
        return after
    xs, ys = traj.seen, traj.low
    for i in range(len(xs) - 1):
        a, b = xs[i], xs[i + 1]
        if b <= after or ys[i + 1] < level:
            continue
        lo = max(a, after)
        ya = traj.at(lo, low=True)
        return lo + (level - ya) / (ys[i + 1] - ya) * (b - lo) if ys[i + 1] > ya else lo
    return None
