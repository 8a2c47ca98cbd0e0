"""What each optimizer is, in one table (as timm's ``OptimInfo``): its LR units, whether it has betas,
momentum, built-in clipping or a trust coefficient, the options ``build()`` passes on, and the bounds of
its hyperparameters. The engine, the recipe checks and ``largebatch.client.optim.build`` read it;
nothing else writes these facts down.

Pure Python (no torch): the science and the service read it without the optimizers' code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["HYPERPARAMETER_BOUNDS", "OPTIMIZERS", "RECIPE_NAMES", "REFERENCE_NAMES", "RULE_EXPONENTS", "UNNAMED_UNITS",
           "Bounds", "OptimInfo", "info", "rule_exponent", "run_units", "same_units", "summary_units", "units_of"]


@dataclass(frozen=True)
class OptimInfo:
    """One optimizer.

    Attributes:
        name: as recipes and references spell it.
        implementation: where ``build()`` takes it from (a dotted path, for people and docs).
        units: LR units; optimizers with the same units share LRs (LANS trains with LAMB's LRs, Adam
            and AdamW agree).
        betas: has Adam's ``(beta1, beta2)`` and ``eps`` inside the square-root denominator.
        momentum: has a heavy-ball ``momentum``.
        layerwise: scales each tensor's step by a trust ratio (``layer_adaptation``).
        clipping: has built-in global gradient-norm clipping (``max_grad_norm``).
        trust_coefficient: takes a ``trust_coefficient`` (LARS); a layer-wise optimizer without one
            has none (its ratio is phi(||x||)/||update||).
        optional_bias_correction: ``bias_correction=False`` is honoured (torch's AdamW always applies it).
        default_eps: the ``eps`` a recipe gets when the reference names none.
        options: the extra recipe fields passed to the optimizer as keyword arguments.
        recipe: can be a recipe's optimizer (Adam is only a reference: it is run as AdamW).
        decoupled_weight_decay: decays the weights apart from the gradient (AdamW-style), so that its
            timescale 1/(lr x weight_decay) is what a recipe keeps (``weight_decay_rule="timescale"``).
        lr_rule: how its best LR grows with the batch well below the critical batch: "linear" for
            SGD-like steps (Goyal et al. 2017; McCandlish et al. 2018 eq. 2.6), "sqrt" for the Adam family
            (LAMB section 4.3; the square-root rule of Adam's SDE, Malladi et al. 2022). The rule's
            exponent (:data:`RULE_EXPONENTS`) is also the prior of the exponent a study's runs fit.
        warmup_rule: how its warmup ratio grows with the batch at a fixed epoch budget (the growth itself:
            ``priors.warmup_growth``): "linear-epoch" (LAMB Tables 4, 5, LANS Table 1), "lars-epochs"
            (epochs growing as 1 + B/LARS_WARMUP_BATCH), "constant-epochs" (Goyal et al. 2017),
            "constant-samples" (AdamW recipes). Also the prior of the warmup curve a study's runs fit.
    """

    name: str
    implementation: str
    units: str
    betas: bool
    momentum: bool
    layerwise: bool
    clipping: bool
    trust_coefficient: bool
    optional_bias_correction: bool
    default_eps: float
    options: frozenset[str]
    recipe: bool = True
    decoupled_weight_decay: bool = False
    lr_rule: str = "sqrt"
    warmup_rule: str = "constant-samples"


_LAYERWISE_OPTIONS = frozenset({"layer_adaptation", "phi_bounds", "nonfinite", "foreach", "capturable"})

OPTIMIZERS: dict[str, OptimInfo] = {i.name: i for i in (
    OptimInfo("lamb", "largebatch.client.optim.LAMB", "layerwise-adam", betas=True, momentum=False,
              layerwise=True, clipping=True, trust_coefficient=False, optional_bias_correction=True,
              default_eps=1e-6, options=_LAYERWISE_OPTIONS | {"skip_adaptation_without_decay", "fused"},
              decoupled_weight_decay=True, warmup_rule="linear-epoch"),
    OptimInfo("lans", "largebatch.client.optim.LANS", "layerwise-adam", betas=True, momentum=False,
              layerwise=True, clipping=False, trust_coefficient=False, optional_bias_correction=True,
              default_eps=1e-6, options=_LAYERWISE_OPTIONS | {"fused"}, decoupled_weight_decay=True,
              warmup_rule="linear-epoch"),
    OptimInfo("adamw", "torch.optim.AdamW", "adam", betas=True, momentum=False, layerwise=False, clipping=False,
              trust_coefficient=False, optional_bias_correction=False, default_eps=1e-8,
              options=frozenset({"foreach", "fused", "amsgrad"}), decoupled_weight_decay=True),
    OptimInfo("adam", "torch.optim.AdamW", "adam", betas=True, momentum=False, layerwise=False, clipping=False,
              trust_coefficient=False, optional_bias_correction=False, default_eps=1e-8,
              options=frozenset({"foreach", "fused", "amsgrad"}), recipe=False),
    OptimInfo("lars", "largebatch.client.optim.LARS", "lars", betas=False, momentum=True, layerwise=True,
              clipping=False, trust_coefficient=True, optional_bias_correction=False, default_eps=1e-9,
              options=_LAYERWISE_OPTIONS, lr_rule="linear", warmup_rule="lars-epochs"),
    OptimInfo("sgd", "torch.optim.SGD", "sgd", betas=False, momentum=True, layerwise=False, clipping=False,
              trust_coefficient=False, optional_bias_correction=False, default_eps=0.0,
              options=frozenset({"foreach", "fused", "nesterov", "dampening"}), lr_rule="linear",
              warmup_rule="constant-epochs"),
)}

#: The exponent of each LR rule: LR ~ batch^e well below the critical batch, (1 + B_noise/B)^-e around it.
RULE_EXPONENTS: dict[str, float] = {"linear": 1.0, "sqrt": 0.5}


def rule_exponent(rule: str) -> float:
    """``rule``'s exponent (:data:`RULE_EXPONENTS`); a ValueError naming it where there is none."""
    try:
        return RULE_EXPONENTS[rule]
    except KeyError:
        raise ValueError(f"unknown LR rule: {rule!r} (known: {', '.join(RULE_EXPONENTS)})") from None


# The names a request's reference may hold, and a recipe's optimizer (the order of the API's schemas).
REFERENCE_NAMES: tuple[str, ...] = tuple(OPTIMIZERS)
RECIPE_NAMES: tuple[str, ...] = tuple(name for name, row in OPTIMIZERS.items() if row.recipe)


@dataclass(frozen=True)
class Bounds:
    """A closed range, or open at the top (``hi_open``)."""

    lo: float
    hi: float
    hi_open: bool = False

    def holds(self, v: float) -> bool:
        return math.isfinite(v) and self.lo <= v and (v < self.hi if self.hi_open else v <= self.hi)

    def __str__(self) -> str:
        return f"[{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


# The range of each hyperparameter a request's reference, a computed recipe or a posted recipe may
# hold (betas: each of the two). A momentum or beta of 1 would never forget: no optimizer trains so.
HYPERPARAMETER_BOUNDS: dict[str, Bounds] = {
    "weight_decay": Bounds(0.0, 10.0),
    "eps": Bounds(0.0, 1.0),
    "momentum": Bounds(0.0, 1.0, hi_open=True),
    "trust_coefficient": Bounds(0.0, 1e4),
    "max_grad_norm": Bounds(0.0, 1e15),
    "betas": Bounds(0.0, 1.0, hi_open=True),
}


def info(name: str) -> OptimInfo:
    """The table's row for ``name``; a ValueError naming it where there is none."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer name: {name!r} (known: {', '.join(OPTIMIZERS)})") from None


# Each optimizer's LR units by name: same_units is asked several times per recipe, and a dict lookup
# is the cheapest way to ask (the table is fixed at import).
_UNITS: dict[str, str] = {name: row.units for name, row in OPTIMIZERS.items()}


def same_units(a: str, b: str) -> bool:
    """Whether LRs of ``a`` and ``b`` are in the same units."""
    try:
        return _UNITS[a] == _UNITS[b]
    except KeyError:
        return info(a).units == info(b).units  # raises the ValueError that names the unknown one


def units_of(name: str) -> str:
    """``name``'s LR units; "?" for a name the table does not know (a run imported from elsewhere: its LR
    is in no units an optimizer here shares)."""
    return _UNITS.get(name, "?")


#: The LR units of runs that name no optimizer where no reference says whose units they are in (a
#: store's per-units summaries): whoever reads them with a reference reads them in its units.
UNNAMED_UNITS = "unnamed"


def run_units(optimizer: str | None, unnamed: str | None = None) -> str:
    """The units of a run's LR: its optimizer's; where it names none, ``unnamed``'s (the reference's), else
    :data:`UNNAMED_UNITS`. One rule for the runs a recipe learns from (``EvidenceModel.in_units_of``) and
    for the store's per-units summaries, so the two roads agree."""
    name = optimizer or unnamed
    return units_of(name) if name else UNNAMED_UNITS


def summary_units(units: str, unnamed: str) -> str:
    """The LR units of a summary bucket read with ``unnamed`` as the reference: the bucket of runs that
    named no optimizer is in the reference's units, as such runs are (:func:`run_units`)."""
    return run_units(None, unnamed) if units == UNNAMED_UNITS else units
