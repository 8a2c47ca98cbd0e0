"""What the engine answers: a :class:`Recipe` (the optimizer and the stages' schedules, with the reasons).

Field names are a public contract: add fields, never rename them. The request side is
:mod:`.models`, which re-exports these names.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .optimizers import RECIPE_NAMES

_M = TypeVar("_M", bound=BaseModel)


def validated(cls: type[_M], **fields: object) -> _M:
    """``cls(**fields)``, every field and model validator run, through the model's pydantic-core
    validator directly: the engine builds four or more models per recipe, and BaseModel.__init__'s
    Python layer took a quarter to a third of each (measured; the validation itself is the same)."""
    return cls.__pydantic_validator__.validate_python(fields)


RecipeOptimizerName = Literal[RECIPE_NAMES]  # the optimizer table's (scaling_rules.optimizers)
# linear: LAMB/BERT's eta0 (1 - t/T); cosine; polynomial: power `decay_power` (2 in the LARS TPU
# reference); step: x `decay_factor` at each of `decay_milestones` (Goyal et al.: x0.1 at 30/60/80 of 90).
# multistep: step decay with DeepSeek LLM's defaults (x0.316 at 80% and 90%: 31.6% then 10%);
# wsd: warmup-stable-decay, the LR held after warmup and decayed linearly over the last 20%.
DecayShape = Literal["linear", "cosine", "polynomial", "step", "multistep", "wsd"]


class OptimizerConfig(BaseModel):
    """Everything an optimizer constructor needs; `build()` in the client turns this into torch."""

    model_config = ConfigDict(extra="allow")

    name: RecipeOptimizerName
    lr: float
    betas: tuple[float, float] | None = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.01
    exclude_from_weight_decay: list[str] = Field(default_factory=list)
    momentum: float | None = None
    trust_coefficient: float | None = None
    bias_correction: bool = True
    max_grad_norm: float | None = None


class Stage(BaseModel):
    model_config = ConfigDict(extra="allow")

    batch_size: int
    steps: int
    peak_lr: float
    warmup_steps: int
    const_steps: int
    decay_steps: int
    warmup_ratio: float
    const_ratio: float
    decay: DecayShape = "linear"
    end_lr: float = 0.0
    decay_power: float | None = None
    decay_milestones: list[float] | None = None
    decay_factor: float | None = None
    seq_len: int | None = None
    batch_tokens: int | None = None
    ideal_lr: float | None = Field(default=None, description="The scaled LR before any cap.")
    lr_cap: float | None = None
    examples_ratio: float | None = Field(
        default=None, description="Predicted examples to reach the reference loss, target/reference (McCandlish eq. 2.11)."
    )
    steps_ratio: float | None = Field(default=None, description="Predicted steps, target/reference (McCandlish).")

    @model_validator(mode="after")
    def _phases_add_up(self) -> Stage:
        if self.warmup_steps + self.const_steps + self.decay_steps != self.steps:
            raise ValueError(
                f"warmup_steps + const_steps + decay_steps ({self.warmup_steps} + {self.const_steps} + "
                f"{self.decay_steps}) must equal steps ({self.steps})"
            )
        return self


# Stage fields added after recipes were first stored: left out of the fingerprint while unset, so a
# recipe that none of them touches keeps the fingerprint it always had.
_ADDED_STAGE_FIELDS = frozenset({"decay_power", "decay_milestones", "decay_factor", "batch_tokens",
                                 "examples_ratio", "steps_ratio"})


class Recipe(BaseModel):
    model_config = ConfigDict(extra="allow")

    optimizer: OptimizerConfig
    stages: list[Stage]
    total_steps: int
    rationale: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)

    def fingerprint(self) -> str:
        """sha256 of what changes training (optimizer and stages), not of the explanations."""
        payload = {"optimizer": self.optimizer.model_dump(mode="json"),
                   "stages": [{k: v for k, v in s.model_dump(mode="json").items()
                               if not (v is None and k in _ADDED_STAGE_FIELDS)} for s in self.stages]}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()
