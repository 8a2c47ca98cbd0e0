"""The standard parameter grouping of large-batch recipes.

BERT's and NVIDIA's pretraining scripts give biases and normalisation weights no weight decay, and
apex's default then also gives them no trust ratio. Matching on names alone (``"LayerNorm"``) misses
``model.ln_f`` or a BatchNorm called ``bn1``; here normalisation layers are found by module type, biases
by attribute name, and name patterns add to that.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["NORM_TYPES", "param_groups_for"]

NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*, Lazy*
        nn.LayerNorm,
        nn.GroupNorm,
        nn.LocalResponseNorm,
        getattr(nn, "RMSNorm", None),
    )
    if t is not None
)


def _reject_fsdp1(model: nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "param_groups_for() cannot group an FSDP1 (FullyShardedDataParallel) model: its flat parameters "
            "mix many layers, so layer-wise optimizers would compute wrong norms. Use FSDP2 "
            "(torch.distributed.fsdp.fully_shard) instead."
        )


def param_groups_for(
    model: nn.Module,
    weight_decay: float,
    exclude: Iterable[str] = (),
    *,
    exclude_from_adaptation: Iterable[str] | None = None,
    norm_types: tuple[type[nn.Module], ...] = NORM_TYPES,
) -> list[dict[str, Any]]:
    """Parameter groups with and without weight decay and layer adaptation.

    A parameter is *excluded* when it belongs to a normalisation module (``norm_types``), is named
    ``bias``, or its full name matches a pattern of ``exclude`` (substring, or fnmatch with wildcards).
    Excluded parameters get ``weight_decay=0`` and ``layer_adaptation=False``. With
    ``exclude_from_adaptation`` the trust-ratio exclusion is decided separately: norms and biases, plus
    those patterns (``()`` for no pattern).

    Returns up to four groups (empty ones are dropped), each with ``params``, ``param_names``,
    ``weight_decay`` and ``layer_adaptation``. Frozen parameters are left out; a shared parameter
    appears once.
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if isinstance(exclude, str):
        raise TypeError("exclude must be a list of name patterns, not a string")
    if isinstance(exclude_from_adaptation, str):
        raise TypeError("exclude_from_adaptation must be a list of name patterns, not a string")
    _reject_fsdp1(model)
    exclude = list(exclude)
    adapt_patterns = exclude if exclude_from_adaptation is None else list(exclude_from_adaptation)

    by_type: set[int] = set()
    for module in model.modules():
        if isinstance(module, norm_types):
            by_type.update(id(p) for p in module.parameters(recurse=False))
        for attr, p in module.named_parameters(recurse=False):
            if attr == "bias":
                by_type.add(id(p))

    groups: dict[tuple[bool, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        structural = id(p) in by_type
        decay = not (structural or name_matches(name, exclude))
        adapt = not (structural or name_matches(name, adapt_patterns))
        group = groups.setdefault(
            (decay, adapt),
            {"params": [], "param_names": [], "weight_decay": float(weight_decay) if decay else 0.0,
             "layer_adaptation": adapt},
        )
        group["params"].append(p)
        group["param_names"].append(name)
    order = [(True, True), (True, False), (False, True), (False, False)]
    return [groups[key] for key in order if key in groups]


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """Substring match (as in BERT's ``no_decay`` list), or fnmatch when the pattern has wildcards."""
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            if fnmatch.fnmatchcase(name, pattern):
                return True
        elif pattern in name:
            return True
    return False
