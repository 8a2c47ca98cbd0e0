"""Weight decay: passed through by default, or moved to keep AdamW's timescale fixed.

Wang & Aitchison 2024: AdamW's weights are an exponential moving average over
tau_iter = 1 / (lr x wd) steps, i.e. tau = B / (lr x wd) examples; what transfers across batch sizes
is tau in epochs (or tokens). Keeping it fixed gives wd' = wd x (B' / B) x (lr / lr').
"""

from __future__ import annotations

from . import optimizers, priors
from ._plan import _fmt, _Plan
from .models import RecommendationRequest


def weight_decay(default: float, name: str, req: RecommendationRequest, plan: _Plan, notes: list[str]) -> float:
    ref = plan.ref
    if ref.weight_decay is None:
        if req.weight_decay_rule == "timescale":
            notes.append(f"weight_decay_rule timescale: the reference gives no weight decay; {name}'s default "
                         f"{_fmt(default)} is used")
        return default
    wd = ref.weight_decay
    if wd == 0 or not priors.same_units(name, ref.optimizer):
        return wd
    move = (plan.batch_x / plan.ref_batch_x) * (ref.lr / plan.lr)
    if move == 1.0:
        return wd
    if req.weight_decay_rule == "timescale" and optimizers.info(name).decoupled_weight_decay:
        new = wd * move
        notes.append(f"weight decay {_fmt(wd)} -> {_fmt(new)}: keeps AdamW's timescale tau = B/(lr x wd) fixed in "
                     f"examples (Wang & Aitchison 2024): x (batch {_fmt(plan.batch_x)}/{_fmt(plan.ref_batch_x)}) x "
                     f"(LR {_fmt(ref.lr)}/{_fmt(plan.lr)})")
        return new
    if req.weight_decay_rule == "timescale":
        notes.append(f"weight_decay_rule timescale: {name}'s weight decay is coupled to the gradient, where the "
                     "AdamW timescale argument does not hold; the reference's is kept")
        return wd
    notes.append(f"weight decay {_fmt(wd)}: the reference's, passed through; AdamW's timescale tau = B/(lr x wd) "
                 f"(Wang & Aitchison 2024) moves x {move:.4g} in examples (set weight_decay_rule \"timescale\" "
                 "to keep it)")
    return wd
