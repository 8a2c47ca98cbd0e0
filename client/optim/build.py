"""`build(model, recipe)`: the one call a training script makes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from largebatch.scaling_rules.models import OptimizerConfig, Recipe
from largebatch.scaling_rules.optimizers import info

from .grouping import param_groups_for
from .lamb import LAMB
from .lans import LANS
from .lars import LARS
from .scheduler import RecipeLR

__all__ = ["build", "build_optimizer"]

def build(model: nn.Module, recipe: Recipe | dict[str, Any]) -> tuple[torch.optim.Optimizer, RecipeLR]:
    """The optimizer and LR scheduler that ``recipe`` names, for ``model``'s trainable parameters.

    ``recipe.optimizer.name``: lamb → :class:`LAMB`, lans → :class:`LANS`, lars → :class:`LARS`,
    adamw → ``torch.optim.AdamW``, sgd → ``torch.optim.SGD`` (momentum). Parameters are grouped by
    :func:`param_groups_for` with ``recipe.optimizer.exclude_from_weight_decay``; the scheduler is
    :class:`RecipeLR`. An option the chosen optimizer cannot honour raises instead of being ignored.
    """
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.model_validate(recipe)
    optimizer = build_optimizer(model, recipe.optimizer)
    return optimizer, RecipeLR(optimizer, recipe)


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer part of :func:`build`."""
    name = config.name
    about = info(name)  # what the optimizer takes: scaling_rules.optimizers, the one table
    extras = dict(config.model_extra or {})
    # name patterns excluded from the trust ratio only (default: the weight-decay exclusions)
    adaptation_patterns = extras.pop("exclude_from_layer_adaptation", None)
    unknown = sorted(set(extras) - about.options)
    if unknown:
        raise ValueError(f"recipe.optimizer has options that {name} does not take: {', '.join(unknown)}")
    groups = param_groups_for(model, config.weight_decay, config.exclude_from_weight_decay,
                              exclude_from_adaptation=adaptation_patterns)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    betas = tuple(config.betas) if config.betas is not None else (0.9, 0.999)

    def refuse(option: str, why: str) -> None:
        raise ValueError(f"recipe.optimizer.{option} is set but {name} {why}")

    if not about.clipping and config.max_grad_norm is not None:
        refuse("max_grad_norm", "has no built-in gradient clipping; clip with torch.nn.utils.clip_grad_norm_")
    if about.layerwise and not about.trust_coefficient and config.trust_coefficient not in (None, 1.0):
        refuse("trust_coefficient", "has none (its trust ratio is phi(||x||)/||update||)")
    if about.betas and not about.optional_bias_correction and not config.bias_correction:
        refuse("bias_correction", "always applies bias correction")

    if name == "lamb":
        return LAMB(groups, config.lr, betas=betas, eps=config.eps, weight_decay=config.weight_decay,
                    bias_correction=config.bias_correction, max_grad_norm=config.max_grad_norm, **extras)
    if name == "lans":
        return LANS(groups, config.lr, betas=betas, eps=config.eps, weight_decay=config.weight_decay,
                    bias_correction=config.bias_correction, **extras)
    if name == "lars":
        return LARS(groups, config.lr, momentum=0.9 if config.momentum is None else config.momentum,
                    weight_decay=config.weight_decay,
                    trust_coefficient=1.0 if config.trust_coefficient is None else config.trust_coefficient,
                    eps=config.eps, **extras)
    torch_groups = [{k: v for k, v in g.items() if k != "layer_adaptation"} for g in groups]
    if name == "adamw":
        return torch.optim.AdamW(torch_groups, lr=config.lr, betas=betas, eps=config.eps,
                                 weight_decay=config.weight_decay, **extras)
    if name == "sgd":
        return torch.optim.SGD(torch_groups, lr=config.lr, momentum=0.0 if config.momentum is None else config.momentum,
                               weight_decay=config.weight_decay, **extras)
    raise ValueError(f"unknown optimizer name: {name!r}")  # pragma: no cover - the model's Literal forbids it
