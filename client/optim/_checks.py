"""Hyperparameter validation of the layer-wise optimizers, with ``torch.optim``-style messages."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

NONFINITE_MODES = ("raise", "skip")
DEFAULT_NONFINITE = "skip"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_lr(lr: Any) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr_value = float(lr.detach().cpu())
    elif _is_number(lr):
        lr_value = float(lr)
    else:
        raise TypeError(f"Invalid learning rate: {lr!r} (expected a float)")
    if not math.isfinite(lr_value) or lr_value < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_nonnegative(name: str, value: Any) -> None:
    if not _is_number(value) or not math.isfinite(value) or value < 0.0:
        raise ValueError(f"Invalid {name} value: {value}")


def check_betas(betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    for i, beta in enumerate(betas):
        if not _is_number(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name} value: {value!r} (expected True or False)")


def check_optional_bool(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"Invalid {name} value: {value!r} (expected None, True or False)")


def check_phi_bounds(bounds: Any) -> None:
    if bounds is None:
        return
    if (
        not isinstance(bounds, (tuple, list))
        or len(bounds) != 2
        or not all(_is_number(b) and math.isfinite(b) for b in bounds)
        or not 0.0 <= bounds[0] <= bounds[1]
        or bounds[1] == 0.0
    ):
        raise ValueError(f"Invalid phi_bounds: {bounds!r} (expected None or (lower, upper) with 0 <= lower <= upper, upper > 0)")


def check_nonfinite(mode: Any) -> None:
    if mode not in NONFINITE_MODES:
        raise ValueError(f"Invalid nonfinite mode: {mode!r} (expected 'raise' or 'skip')")



def check_common_options(group: dict[str, Any]) -> None:
    """The options every layer-wise optimizer shares (``fused`` where it has one)."""
    check_bool("layer_adaptation", group["layer_adaptation"])
    check_phi_bounds(group["phi_bounds"])
    check_nonfinite(group["nonfinite"])
    check_optional_bool("foreach", group["foreach"])
    if "fused" in group:
        check_optional_bool("fused", group["fused"])
    if "capturable" in group:
        check_capturable(group)



def check_capturable(group: dict[str, Any]) -> None:
    check_bool("capturable", group["capturable"])


def check_max_grad_norm(value: Any) -> None:
    if value is not None and (not _is_number(value) or not math.isfinite(value) or value <= 0):
        raise ValueError(f"Invalid max_grad_norm value: {value} (expected None or a number > 0)")
