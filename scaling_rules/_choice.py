"""Which optimizer the recipe uses: advice with its evidence, not a cliff.

A user-fixed optimizer (``request.optimizer``) is kept. Otherwise the reference's optimizer is kept
until the target batch passes both the batch where the papers show that family failing and the
batch the reference itself trained at (the hysteresis: a recipe that works is never switched for
staying where it is). Every switch names the alternative and the counter-evidence; the warmup is
carried over in samples by :func:`._phases.warmup_ratio`.
"""

from __future__ import annotations

from collections.abc import Callable

from . import priors
from ._plan import _a, _Plan
from .models import RecommendationRequest

_NADO = ("counter-evidence: Nado et al. 2021 matched LAMB's BERT results with a carefully tuned AdamW (and "
         "Nesterov) at 32K, so keeping AdamW with a long warmup and a tuned LR is a real alternative: set "
         "\"optimizer\": \"adamw\" to keep it")


def _limit(ref_opt: str, family: str, mixed: bool) -> tuple[float, str, Callable[[], str]] | None:
    """(batch from which the family is left, the new optimizer, what says why) for a free choice. The
    why is built only where it is shown (a switch, or a fixed optimizer past its limit): most recipes
    keep their optimizer."""
    if ref_opt in ("adamw", "adam"):
        return priors.ADAMW_FAILS_AT, "lamb", lambda: (
            "LAMB Table 8: AdamW stops scaling at 16K on BERT-Large (F1 target 90.5): with 5% warmup every "
            "LR diverged, with 10% the best was 88.54 (2e-4), with 20% warmup 3e-4 trained but reached "
            f"85.65; LAMB reached 91.35 there (Table 4). {_NADO}"
            + ("" if family == "transformer" else
               f"; the evidence is from BERT, this is {_a(family)} model (LAMB appendix H: tuned Adam/AdamW "
               "stayed near 73% on ResNet-50 where LAMB reached 76%)"))
    if ref_opt == "sgd":
        return priors.SGD_MAX_BATCH + 1, "lars" if family == "cnn" else "lamb", lambda: (
            "Goyal et al. 2017: linear scaling with warmup holds to 8K on ImageNet and loses accuracy beyond; "
            + ("LARS's layer-wise trust ratio trains ResNet-50 to 32K and beyond (You et al. 2017; the TPU "
               "reference)" if family == "cnn" else
               "LAMB is the layer-wise optimizer with evidence off CNNs (LAMB Tables 4, 5)")
            + "; counter-evidence: Nado et al. 2021 report tuned Nesterov momentum matching LARS at 32K")
    if ref_opt == "lars" and family != "cnn":
        return (priors.LARS_FAILS_AT_ATTENTION, "lamb",
                lambda: "LAMB Table 2: LARS stops scaling at 16K on BERT, where LAMB reaches 32K")
    if ref_opt == "lamb":
        limit = priors.LAMB_MAX_BATCH_MIXED if mixed else priors.LAMB_MAX_BATCH
        return limit + 1, "lans", lambda: (
            f"LAMB was tested to {limit:,} ({'mixed-batch, LAMB section 4.1' if mixed else 'LAMB Table 4'}); "
            "LANS (Nesterov + per-block normalised gradients, same LR units) trained BERT-Large at 96K/33K "
            "(LANS Table 1)")
    return None


def choose_optimizer(req: RecommendationRequest, plans: list[_Plan]) -> tuple[str, list[str], list[str]]:
    """Returns (name, rationale, warnings) and marks each plan's ``switch_at``."""
    family = req.model.family
    max_batch = max([p.batch for p in plans])  # (a list: cheaper than a generator)
    ref_opt = plans[0].ref.optimizer
    mixed = len(plans) > 1
    notes: list[str] = []
    warns: list[str] = []
    if req.optimizer is not None:
        name = req.optimizer
        notes.append(f"optimizer {name}: fixed by the request, kept")
        free = _limit(name if name != "adamw" else "adam", family, mixed)
        if free is not None and max_batch >= free[0] and name != "lamb":
            warns.append(f"{name} at batch {max_batch}: {free[2]()}")
        if name == "lamb" and max_batch >= (free[0] if free else 0):
            warns.append(f"LAMB at batch {max_batch}: the LAMB paper scaled to 32K (64K only mixed-batch)")
        if name != priors.canonical(ref_opt):
            for plan in plans:
                plan.switch_at = plan.ref_batch_x
    else:
        name = priors.canonical(ref_opt)
        found = _limit(ref_opt, family, mixed)
        ref_max = max([p.ref_batch_x for p in plans])
        if found is not None and max_batch >= found[0] and max_batch > ref_max:
            at, name, why_of = found
            why = why_of()
            notes.append(f"optimizer {name} instead of the reference's {ref_opt}: batch {max_batch} is past where "
                         f"{ref_opt} is shown to fail ({why}). Switched with hysteresis: only past both that batch "
                         f"and the reference's own batch {ref_max:g}")
            for plan in plans:
                plan.switch_at = max(at, plan.ref_batch_x)
        else:
            why = (f"within where it is shown to work (switch from {found[0]:g})" if found is not None
                   else "no published failure for it at this batch")
            if found is not None and max_batch >= found[0]:
                why = f"the reference itself trained at batch {ref_max:g} with it (a working recipe is kept)"
            notes.append(f"optimizer {name}: the reference's, kept: {why}")
            if found is not None and found[1] == "lamb" and ref_opt in ("adamw", "adam") \
                    and max_batch >= priors.ADAMW_FAILS_AT / 2:
                notes.append("AdamW near LAMB Table 8's 16K, where it needed >= 10-20% warmup not to diverge: "
                             "the LR cap below follows the warmup")
    if name in ("lamb", "lans") and ref_opt in ("adam", "adamw"):
        warns.append("the reference LR was tuned for AdamW; LAMB/LANS LRs are per-layer relative steps and "
                     "usually several times larger (BERT: 1e-4 AdamW vs 6.25e-4 LAMB at 512): the LR is "
                     "re-anchored on LAMB's prior where one exists; check it with \"explore\"")
    if name == "adamw" and ref_opt in ("lamb", "lans", "lars"):
        warns.append("the reference LR was tuned for a layer-wise optimizer; AdamW usually needs a smaller LR")
    if name == "lars" and ref_opt == "sgd":
        warns.append("the reference LR was tuned for SGD; LARS LRs are scaled by its trust coefficient (0.001) "
                     "and are not comparable: the LR is re-anchored on the LARS prior")
    if name == "lars" and max_batch > 65536:
        warns.append(f"batch {max_batch} is beyond what the papers tested (65536 for LARS)")
    if name == "lans" and max_batch > priors.LANS_MAX_BATCH:
        warns.append(f"batch {max_batch} is beyond what the papers tested ({priors.LANS_MAX_BATCH} for LANS)")
    return name, notes, warns
