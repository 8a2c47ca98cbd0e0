"""How branches' losses read as a critical batch (the pure half of :mod:`._probe`, no torch).

At equal loss, as steps-to-target is (McCandlish et al. 2018, eq. 2.11: reaching a loss at batch B takes
E_min (1 + B/B_crit) examples): the smallest-k branch's loss is also read along its window
(:func:`curve_steps`), made monotone (:func:`_monotone`), each bigger branch's final loss is matched on
that curve, and the examples the smallest batch needed for it give r_k = E(kB)/E(kmin B) =
(1 + kB/B_crit)/(1 + kmin B/B_crit), fitted for B_crit. The interval comes from the evaluation sample and
from the data order: the branches see one order, and how far the smallest branch's loss wanders about its
own trend from step to step stands in for how far another order would move each loss (:func:`_roughness`).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["curve_steps", "fit_critical_batch"]

_GRID = 481  # log-spaced B_crit candidates, 2^-6 .. 2^14 times the largest branch batch (24 per octave)
_DRAWS = 400


def curve_steps(steps: int, ks: Sequence[int]) -> list[int]:
    """The smallest-k branch's step counts its loss is read at: every step of its window when that is at
    most 16 steps, else 4 per octave from the largest branch's step count up (the examples any branch's
    loss can be matched at lie in that range), always both ends."""
    lo, hi = steps // max(ks), steps // min(ks)
    if hi <= 16:
        return list(range(1, hi + 1))
    out = {lo, hi}
    n = float(lo)
    while n < hi:
        out.add(min(hi, round(n)))
        n *= 2 ** 0.25
    return sorted(out)


def _examples_ratio(k: int, gain: float, kmin: int, steps: int, curve: Sequence[tuple[int, float]]) -> float:
    """E(k B) / E(kmin B) at the loss branch k reached: the window's examples over the examples the smallest-k
    branch needed for the same gain (read off its curve, linear between its points; (0, 0) its start),
    kept within [1, k/kmin], perfect and no scaling."""
    top = k / kmin
    if gain >= curve[-1][1]:
        return 1.0  # as far as the smallest batch with the same examples: no cost seen
    n = None
    path = [(0, 0.0), *curve]
    for (n0, g0), (n1, g1) in itertools.pairwise(path):
        if g0 <= gain <= g1:  # the first stretch of the curve that reaches the gain
            n = n0 + (gain - g0) / (g1 - g0) * (n1 - n0) if g1 > g0 else n1
            break
    if n is None or n <= 0:
        return top
    return min(max(steps / (kmin * n), 1.0), top)


def _best(batch: float, kmin: int, ks: Sequence[int], ratios: list[list[float]], grid: np.ndarray) -> np.ndarray:
    """For each row of examples ratios (one per k in ``ks``), the grid's B_crit whose r_k fit it best in log."""
    k = np.asarray(ks, dtype=float)
    model = np.log((1 + k[None, :] * batch / grid[:, None]) / (1 + kmin * batch / grid[:, None]))
    sse = ((np.log(np.asarray(ratios))[:, None, :] - model[None, :, :]) ** 2).sum(axis=2)
    return grid[sse.argmin(axis=1)]


def fit_critical_batch(batch: float, ks: Sequence[int], steps: int, curve: Sequence[tuple[int, float, float]],
                       gains: Sequence[float], ses: Sequence[float]) -> tuple[float | None, tuple[float, float] | None,
                                                                             str, dict[int, float]]:
    """(B_crit, its 5%..95% interval, a note, each branch's examples ratio) from branches k x ``batch`` of
    ``steps // k`` steps (module docstring): each branch's gain is matched on the smallest-k branch's
    ``curve`` of (its steps, gain, standard error), giving the examples ratio r_k = E(kB)/E(kmin B) at that
    loss, and r_k = (1 + kB/B_crit)/(1 + kmin B/B_crit) is fitted in log over a log grid; the interval
    from the same reading of gains redrawn within their standard errors."""
    kmin = min(ks)
    pts = [(k, g, s) for k, g, s in zip(ks, gains, ses, strict=True) if k != kmin and math.isfinite(g) and math.isfinite(s)]
    line = [(n, g, s) for n, g, s in curve if math.isfinite(g) and math.isfinite(s)]
    if not pts or not line:
        return None, None, "fewer than two branches with a finite loss: no fit", {}
    final, order = line[-1], _roughness(line)
    if final[1] <= 2 * math.hypot(final[2], order):
        return None, None, (f"the k = {kmin} branch gained {final[1]:.3g} (standard error {final[2]:.3g} from the "
                            f"evaluation, sd {order:.3g} of its loss from step to step) in the window: no resolved "
                            "progress to compare; lengthen the window (steps=) or probe earlier in the run"), {}
    kmax = max(k for k, *_ in pts)
    grid = kmax * batch * 2.0 ** (-6 + 20 * np.arange(_GRID) / (_GRID - 1))

    def read(gain_of: Callable[[float, float], float]) -> list[float]:
        c = _monotone([(n, gain_of(g, s)) for n, g, s in line])
        return [_examples_ratio(k, gain_of(g, s), kmin, steps, c) for k, g, s in pts]

    ratios = read(lambda g, s: g)
    rng = random.Random(0)  # its own generator: the caller's random state is not drawn from
    drawn = [read(lambda g, s: g + math.hypot(s, order) * rng.gauss(0.0, 1.0)) for _ in range(_DRAWS)]
    fits = _best(batch, kmin, [k for k, *_ in pts], [ratios, *drawn], grid).tolist()
    best, draws = fits[0], sorted(fits[1:])
    lo, hi = draws[int(0.05 * _DRAWS)], draws[int(0.95 * _DRAWS) - 1]
    by_k = {k: r for (k, *_), r in zip(pts, ratios, strict=True)}
    top, bottom = float(grid[-1]), float(grid[0])
    span = f"k x B spans {kmin * batch:.4g}..{kmax * batch:.4g}"
    if best >= top:
        return None, (lo, math.inf), (f"the bigger batches cost no examples ({span}): B_crit is above the "
                                      "branches' reach; probe with larger k"), by_k
    if best <= bottom:
        return None, (0.0, hi), f"the bigger batches gained nothing ({span}): B_crit is below B; probe with smaller B", by_k
    where = "inside" if kmin * batch <= best <= kmax * batch else "outside (extrapolated)"
    upper = math.inf if hi >= top else hi
    return best, (lo, upper), (f"B_crit {best:.4g} examples, 90% interval {lo:.4g}..{upper:.4g} from the evaluation "
                               f"sample and the data order (sd {order:.3g} of the loss, read off the k = {kmin} "
                               f"branch's curve); {span}, the estimate {where} that range"), by_k


def _monotone(curve: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The curve's gains made non-decreasing in the steps, each run of violations pooled to its mean
    (pool-adjacent-violators: the least-squares monotone curve). The equal-loss reading takes the first
    step a gain is reached; on a noisy curve an early upward swing reaches it too soon, so a bigger
    branch's examples cost read high and B_crit low (0.8x the truth at noise 5% of the window's gain).
    A curve already monotone is left as it is."""
    blocks: list[list[float]] = []  # [sum, count]
    for _, g in curve:
        blocks.append([g, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    gains = [b[0] / b[1] for b in blocks for _ in range(int(b[1]))]
    return [(n, g) for (n, _), g in zip(curve, gains, strict=True)]


def _roughness(line: Sequence[tuple[int, float, float]]) -> float:
    """The sd of the smallest branch's loss about its own trend: each inner point against the line through
    its neighbours (Gasser et al. 1986's pseudo-residuals, for unequal steps). The branches see one data
    order: the loss after a given step moves with the batches drawn, about as much from one step to the
    next as from one order to another (a branch's evaluation, on the same held-out examples every time,
    does not show it). A smooth curve's own bend adds to it a little: the interval errs wide."""
    sq = []
    for (x0, y0, _), (x1, y1, _), (x2, y2, _) in zip(line, line[1:], line[2:], strict=False):
        a = (x2 - x1) / (x2 - x0)
        b = 1.0 - a
        sq.append((y1 - a * y0 - b * y2) ** 2 / (1.0 + a * a + b * b))
    return math.sqrt(sum(sq) / len(sq)) if sq else 0.0
