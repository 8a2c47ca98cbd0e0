"""largebatch.scaling_rules: the science of the LAMB and LANS papers, in pure Python.

Imports no torch, fastapi, optuna, sqlalchemy or httpx (a test enforces it).
"""

from .engine import RecipeError, recommend
from .evidence import BatchSummary
from .models import (
    ModelSpec,
    OptimizerConfig,
    Recipe,
    RecommendationRequest,
    Reference,
    Stage,
    StageRequest,
    Target,
)
from .schedule import lr_at, lr_curve, schedule_area

__all__ = [
    "BatchSummary",
    "ModelSpec",
    "OptimizerConfig",
    "Recipe",
    "RecipeError",
    "RecommendationRequest",
    "Reference",
    "Stage",
    "StageRequest",
    "Target",
    "lr_at",
    "lr_curve",
    "recommend",
    "schedule_area",
]
