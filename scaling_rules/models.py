"""The typed contract shared by the engine, the CLI, the REST service and the client.

A :class:`RecommendationRequest` goes in, a :class:`Recipe` comes out. Field names are a public
contract (issue #2): add fields, never rename them.
"""

from __future__ import annotations

import itertools
import math
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from .optimizers import HYPERPARAMETER_BOUNDS, REFERENCE_NAMES

# The answer's models live in .recipe; importing them from here, as callers always have, still works.
from .recipe import DecayShape, RecipeOptimizerName
from .recipe import OptimizerConfig as OptimizerConfig
from .recipe import Recipe as Recipe
from .recipe import Stage as Stage

Family = Literal["transformer", "cnn", "other"]
# What a reference run may have used: anything we know how to scale from.
ReferenceOptimizerName = Literal[REFERENCE_NAMES]  # the optimizer table's (scaling_rules.optimizers)
Rule = Literal["sqrt", "linear"]
Budget = Literal["same-epochs", "same-steps", "same-loss"]
WeightDecayRule = Literal["keep", "timescale"]
AdamHparams = Literal["keep", "sde"]


def _finite_positive(name: str, value: float | None, hi: float = 1e12) -> float | None:
    if value is None:
        return value
    if isinstance(value, bool) or not math.isfinite(value) or value <= 0 or value > hi:
        raise ValueError(f"{name} must be a finite number in (0, {hi:g}], got {value!r}")
    return value


def _lr_value(name: str, value: float | None) -> float | None:
    if value is None:
        return value
    if isinstance(value, bool) or not math.isfinite(value) or not MIN_LR <= value <= MAX_LR:
        raise ValueError(f"{name} must be a finite number in [{MIN_LR:g}, {MAX_LR:g}], got {value!r}")
    return value


def _check_milestones(v: list[float] | None) -> list[float] | None:
    if v is None:
        return v
    if not v or len(v) > 16:
        raise ValueError("decay_milestones must hold 1 to 16 fractions")
    if any(not math.isfinite(m) or not 0 < m < 1 for m in v) or list(v) != sorted(set(v)):
        raise ValueError(f"decay_milestones must be increasing fractions in (0, 1), got {v!r}")
    return v


def _check_factor(v: float | None) -> float | None:
    if v is not None and (not math.isfinite(v) or not 0 < v < 1):
        raise ValueError(f"decay_factor must be in (0, 1), got {v!r}")
    return v


class _Strict(BaseModel):
    # Extra keys are refused so a typo ("batchsize") is an error, not a silently ignored field.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=True)


# Limits, enforced at parse time (422): nobody trains past them, and every backend stores them.
MAX_COUNT = 2**31 - 1  # batch sizes, tokens, sequence lengths, steps: 32-bit columns
MAX_PARAMS = 10**15  # parameters: 1,000x the largest model trained so far
MAX_LR = 1e4  # LRs: the largest published (LARS TPU) is 41
MIN_LR = 1e-12
MAX_STAGES = 64
StrictPosInt = Annotated[int, Field(strict=True, gt=0, le=MAX_COUNT)]
# Numbers must be JSON numbers: not true/false, not "512".
StrictNum = Annotated[float, Field(strict=True)]


def _batch_or_auto(v: object) -> int | str | None:
    if v is None or v in ("auto", "ramp"):
        return v  # type: ignore[return-value]
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_COUNT:
        raise ValueError(f'batch_size must be an integer in 1..{MAX_COUNT}, "auto" or "ramp", got {v!r}')
    return v


BatchOrAuto = Annotated[
    int | str | None,
    PlainValidator(_batch_or_auto),
    WithJsonSchema({"anyOf": [{"type": "integer", "exclusiveMinimum": 0}, {"const": "auto"}, {"const": "ramp"},
                              {"type": "null"}]}),
]

# The examples overhead E(B)/E_min - 1 that batch "auto" accepts by default: Zhang et al. 2024's
# critical batch (20%). E = E_min (1 + B/B_noise) puts it at B = 0.2 B_noise.
DEFAULT_MAX_OVERHEAD = 0.2
MAX_OVERHEAD = 100.0  # 100x the minimal examples: beyond any batch anyone would choose on purpose
MAX_TRAJECTORY_POINTS = 1024


class NoisePoint(_Strict):
    """The critical batch at one point of the reference run: B_noise (in the units of the reference's
    batch_size) after ``examples_seen`` sequences or ``tokens_seen`` tokens of the reference run."""

    examples_seen: StrictNum | None = Field(default=None, description="Sequences the reference run had seen.")
    tokens_seen: StrictNum | None = Field(default=None, description="Tokens the reference run had seen (needs "
                                                                     "reference.seq_len).")
    noise_scale: StrictNum = Field(description="B_noise measured there, in the units of reference.batch_size.")
    noise_scale_low: StrictNum | None = Field(
        default=None, description="A lower bound of B_noise there (the batch ramp doubles on it; default noise_scale).")

    @field_validator("examples_seen", "tokens_seen")
    @classmethod
    def _seen(cls, v: float | None, info) -> float | None:
        if v is not None and (isinstance(v, bool) or not math.isfinite(v) or not 0 <= v <= 1e30):
            raise ValueError(f"{info.field_name} must be a finite number in [0, 1e30], got {v!r}")
        return v

    @field_validator("noise_scale", "noise_scale_low")
    @classmethod
    def _noise(cls, v: float | None, info) -> float | None:
        return _finite_positive(info.field_name, v)

    @model_validator(mode="after")
    def _one_unit(self) -> NoisePoint:
        if (self.examples_seen is None) == (self.tokens_seen is None):
            raise ValueError("give examples_seen or tokens_seen (one of them)")
        if self.noise_scale_low is not None and self.noise_scale_low > self.noise_scale:
            raise ValueError(f"noise_scale_low ({self.noise_scale_low:g}) must be <= noise_scale "
                             f"({self.noise_scale:g})")
        return self

    @property
    def seen(self) -> float:
        return self.examples_seen if self.examples_seen is not None else self.tokens_seen  # type: ignore[return-value]


class _DecaySpec(_Strict):
    """The decay parameters a reference (its own schedule) or a request (the recipe's) may give."""

    decay_power: StrictNum | None = Field(default=None, description="Power of the polynomial decay (default 2).")
    decay_milestones: list[float] | None = Field(
        default=None, description="Step decay: fractions of the run where the LR drops (default 30/90, 60/90, 80/90)."
    )
    decay_factor: StrictNum | None = Field(default=None, description="Step decay: the factor at each milestone (0.1).")

    @field_validator("decay_power")
    @classmethod
    def _power(cls, v: float | None) -> float | None:
        return _finite_positive("decay_power", v, 100)

    @field_validator("decay_milestones")
    @classmethod
    def _milestones(cls, v: list[float] | None) -> list[float] | None:
        return _check_milestones(v)

    @field_validator("decay_factor")
    @classmethod
    def _factor(cls, v: float | None) -> float | None:
        return _check_factor(v)


class ModelSpec(_Strict):
    params: Annotated[int, Field(strict=True, gt=0, le=MAX_PARAMS)] = Field(
        description="Number of trainable parameters.")
    family: Family = "transformer"
    width: StrictPosInt | None = Field(
        default=None, description="Hidden width (d_model); with reference.model_width the LR moves muP-style.")
    shared_weights: bool = Field(
        default=False, description="The model reuses weights across layers (ALBERT-style): params undercount it.")


class Reference(_DecaySpec):
    """A training setup that is known to work at a small batch."""

    batch_size: StrictPosInt | None = Field(default=None, description="Batch in sequences (or give batch_tokens).")
    batch_tokens: StrictPosInt | None = Field(
        default=None, description="Batch in tokens instead of sequences (GPT-3 style); needs seq_len for a recipe."
    )
    seq_len: StrictPosInt | None = Field(default=None, description="Tokens per sequence of the reference run.")
    lr: StrictNum = Field(description="Peak learning rate of the reference run (1e-12 .. 1e4).")
    optimizer: ReferenceOptimizerName = "lamb"
    warmup_ratio: StrictNum | None = Field(default=None, description="Warmup steps / total steps.")
    warmup_steps: Annotated[int, Field(strict=True, ge=0, le=MAX_COUNT)] | None = None
    steps: StrictPosInt | None = Field(
        default=None, description="Total steps of the reference run (needed unless the target gives steps)."
    )
    weight_decay: StrictNum | None = None
    betas: tuple[float, float] | None = Field(default=None, description="Adam-family betas of the reference run.")
    eps: StrictNum | None = Field(default=None, description="Optimizer epsilon of the reference run.")
    momentum: StrictNum | None = Field(default=None, description="SGD/LARS momentum of the reference run.")
    model_params: Annotated[int, Field(strict=True, gt=0, le=MAX_PARAMS)] | None = Field(
        default=None, description="Parameters of the model the reference was measured on (default: model.params)."
    )
    model_width: StrictPosInt | None = Field(
        default=None, description="Hidden width of the model the reference was measured on (muP-style transfer).")
    decay: DecayShape | None = Field(default=None, description="The reference's decay shape (kept by the recipe).")
    noise_scale: StrictNum | None = Field(
        default=None, description="Measured gradient noise scale B_noise, in the units of batch_size (McCandlish 2018)."
    )
    noise_trajectory: list[NoisePoint] | None = Field(
        default=None, description="B_noise along the reference run (1 to 1024 points, increasing examples_seen or "
                                  "tokens_seen): the same-loss budget integrates the examples cost over it, and "
                                  "batch \"ramp\" doubles the batch along it.")

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        return _lr_value("lr", v)  # type: ignore[return-value]

    @field_validator("noise_trajectory")
    @classmethod
    def _trajectory(cls, v: list[NoisePoint] | None) -> list[NoisePoint] | None:
        if v is None:
            return v
        if not 1 <= len(v) <= MAX_TRAJECTORY_POINTS:
            raise ValueError(f"noise_trajectory must hold 1 to {MAX_TRAJECTORY_POINTS} points, got {len(v)}")
        if len({p.examples_seen is None for p in v}) > 1:
            raise ValueError("noise_trajectory: give examples_seen in every point or tokens_seen in every point")
        seen = [p.seen for p in v]
        if any(b <= a for a, b in itertools.pairwise(seen)):
            raise ValueError("noise_trajectory must be sorted by examples_seen/tokens_seen, strictly increasing")
        return v

    @field_validator("noise_scale")
    @classmethod
    def _noise(cls, v: float | None) -> float | None:
        return _finite_positive("noise_scale", v)

    @field_validator("warmup_ratio")
    @classmethod
    def _warmup_ratio(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or not 0 <= v < 1):
            raise ValueError(f"warmup_ratio must be in [0, 1), got {v!r}")
        return v

    @field_validator("weight_decay", "eps", "momentum")
    @classmethod
    def _bounded(cls, v: float | None, info: ValidationInfo) -> float | None:
        bounds = HYPERPARAMETER_BOUNDS[info.field_name]  # (the optimizer table's ranges)
        if v is not None and not bounds.holds(v):
            raise ValueError(f"{info.field_name} must be a finite number in {bounds}, got {v!r}")
        return v

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        bounds = HYPERPARAMETER_BOUNDS["betas"]
        if v is not None and not all(bounds.holds(b) for b in v):
            raise ValueError(f"betas must each be in {bounds}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_warmup(self) -> Reference:
        if self.batch_size is None and self.batch_tokens is None:
            raise ValueError("give batch_size (sequences) or batch_tokens")
        if self.batch_size is not None and self.batch_tokens is not None:
            if self.seq_len is not None and self.batch_size * self.seq_len != self.batch_tokens:
                raise ValueError(f"batch_tokens ({self.batch_tokens}) must equal batch_size x seq_len "
                                 f"({self.batch_size} x {self.seq_len})")
            if self.seq_len is None:
                self.seq_len = max(1, round(self.batch_tokens / self.batch_size))
        if self.batch_size is None and self.seq_len is not None:
            if self.batch_tokens % self.seq_len:  # type: ignore[operator]
                raise ValueError(f"batch_tokens ({self.batch_tokens}) must be a multiple of seq_len ({self.seq_len})")
            self.batch_size = self.batch_tokens // self.seq_len  # type: ignore[operator]
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            raise ValueError("give warmup_ratio or warmup_steps, not both")
        if self.warmup_steps is not None and self.steps is not None and self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        if self.noise_trajectory is not None and self.noise_scale is not None:
            raise ValueError("give noise_scale or noise_trajectory, not both (a trajectory of one point is a "
                             "constant)")
        if self.noise_trajectory is not None and self.noise_trajectory[0].tokens_seen is not None \
                and self.seq_len is None:
            raise ValueError("noise_trajectory in tokens_seen needs seq_len (or batch_tokens with batch_size)")
        return self

    @property
    def ratio(self) -> float:
        if self.warmup_ratio is not None:
            return self.warmup_ratio
        if self.warmup_steps is not None and self.steps is not None:
            return self.warmup_steps / self.steps
        return 0.0

    @property
    def tokens(self) -> int | None:
        """Tokens per batch, where known."""
        if self.batch_tokens is not None:
            return self.batch_tokens
        if self.batch_size is not None and self.seq_len is not None:
            return self.batch_size * self.seq_len
        return None


class Target(_Strict):
    batch_size: BatchOrAuto = Field(
        default=None, description='Target batch in sequences; "auto": max_overhead x B_noise (the critical batch); '
                                  '"ramp": from min_batch_size, doubled as the critical batch grows along '
                                  "reference.noise_trajectory."
    )
    batch_tokens: StrictPosInt | None = Field(default=None, description="Target batch in tokens instead.")
    seq_len: StrictPosInt | None = Field(default=None, description="Tokens per sequence (default: the reference's).")
    steps: StrictPosInt | None = Field(
        default=None, description="Explicit step budget; overrides `budget` (LANS trained 3519 steps at 96K)."
    )
    min_batch_size: StrictPosInt | None = Field(default=None, description='Lower device limit for "auto".')
    max_batch_size: StrictPosInt | None = Field(default=None, description='Upper device limit for "auto".')
    tokens: StrictNum | None = Field(
        default=None, description="Training budget in tokens (a critical-batch prior; with \"auto\", Step Law/DeepSeek).")
    compute: StrictNum | None = Field(
        default=None, description="Training budget in FLOPs (with batch_size \"auto\": DeepSeek LLM's laws).")
    max_overhead: StrictNum | None = Field(
        default=None, description='Examples overhead E(B)/E_min - 1 accepted by batch "auto" and "ramp" (default '
                                  "0.2: Zhang et al. 2024's critical batch; 1.0 is B = B_noise).")

    @field_validator("tokens", "compute")
    @classmethod
    def _budget(cls, v: float | None, info) -> float | None:
        return _finite_positive(info.field_name, v, 1e30)

    @field_validator("max_overhead")
    @classmethod
    def _overhead(cls, v: float | None) -> float | None:
        return _finite_positive("max_overhead", v, MAX_OVERHEAD)

    @property
    def overhead(self) -> float:
        return DEFAULT_MAX_OVERHEAD if self.max_overhead is None else self.max_overhead

    @model_validator(mode="after")
    def _one_batch(self) -> Target:
        if self.batch_size is None and self.batch_tokens is None:
            raise ValueError("give batch_size (sequences, or \"auto\") or batch_tokens")
        if self.batch_size is not None and self.batch_tokens is not None:
            raise ValueError("give batch_size or batch_tokens, not both")
        if (self.min_batch_size is not None and self.max_batch_size is not None
                and self.min_batch_size > self.max_batch_size):
            raise ValueError(f"min_batch_size ({self.min_batch_size}) must be <= max_batch_size ({self.max_batch_size})")
        if self.max_overhead is not None and self.batch_size not in ("auto", "ramp"):
            raise ValueError('max_overhead applies to batch_size "auto" or "ramp" only')
        return self


class StageRequest(_Strict):
    """One stage of a multi-stage (mixed-batch) run, e.g. BERT's seq-128 then seq-512 phases."""

    batch_size: StrictPosInt | None = None
    batch_tokens: StrictPosInt | None = Field(default=None, description="The stage's batch in tokens instead.")
    share: StrictNum | None = Field(default=None, description="Fraction of the reference steps this stage covers.")
    seq_len: StrictPosInt | None = None
    reference: Reference | None = None
    steps: StrictPosInt | None = None
    lr: StrictNum | None = Field(default=None, description="Explicit peak LR (skips the scaling rule).")
    lr_cap: StrictNum | None = None
    warmup_scale: StrictNum | None = Field(
        default=None, description="Multiply the reference warmup ratio by this instead of the batch ratio."
    )
    plateau_ratio: StrictNum | None = Field(
        default=None, description="warmup + constant phase as a fraction of the stage (LANS: 0.7, 0.3)."
    )

    @field_validator("share", "plateau_ratio")
    @classmethod
    def _fraction(cls, v: float | None, info) -> float | None:
        if v is not None and (not math.isfinite(v) or not 0 < v <= 1):
            raise ValueError(f"{info.field_name} must be in (0, 1], got {v!r}")
        return v

    @field_validator("lr", "lr_cap")
    @classmethod
    def _positive(cls, v: float | None, info) -> float | None:
        return _lr_value(info.field_name, v)

    @field_validator("warmup_scale")
    @classmethod
    def _scale(cls, v: float | None) -> float | None:
        return _finite_positive("warmup_scale", v, 1e4)

    @model_validator(mode="after")
    def _one_batch(self) -> StageRequest:
        if self.batch_size is None and self.batch_tokens is None:
            raise ValueError("give batch_size (sequences) or batch_tokens")
        if self.batch_size is not None and self.batch_tokens is not None:
            raise ValueError("give batch_size or batch_tokens, not both")
        return self


class RecommendationRequest(_DecaySpec):
    model: ModelSpec
    reference: Reference | None = None
    target: Target | None = None
    rule: Rule | None = None
    budget: Budget = "same-epochs"
    lr_cap: StrictNum | None = None
    optimizer: RecipeOptimizerName | None = None
    stages: list[StageRequest] | None = Field(default=None, max_length=MAX_STAGES)
    plateau_ratio: StrictNum | None = None
    decay: DecayShape | None = Field(
        default=None, description="Decay shape; default: the reference's, else the new optimizer's prior's, else linear."
    )
    end_lr: StrictNum = 0.0
    adam_hparams: AdamHparams = Field(
        default="keep", description='"keep" the reference betas/eps, or "sde": Malladi et al. 2022 scaling.'
    )
    weight_decay_rule: WeightDecayRule = Field(
        default="keep", description='"keep" the reference weight decay, or "timescale": keep tau = 1/(lr x wd) '
                                    "fixed in examples (Wang & Aitchison 2024)."
    )

    @field_validator("lr_cap")
    @classmethod
    def _cap(cls, v: float | None) -> float | None:
        return _lr_value("lr_cap", v)

    @field_validator("plateau_ratio")
    @classmethod
    def _plateau(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or not 0 < v <= 1):
            raise ValueError(f"plateau_ratio must be in (0, 1], got {v!r}")
        return v

    @field_validator("end_lr")
    @classmethod
    def _end_lr(cls, v: float) -> float:
        if not math.isfinite(v) or not 0 <= v <= MAX_LR:
            raise ValueError(f"end_lr must be a finite number in [0, {MAX_LR:g}], got {v!r}")
        return v

    @model_validator(mode="after")
    def _shape(self) -> RecommendationRequest:
        if self.stages is None:
            if self.reference is None:
                raise ValueError("reference is required (or give stages, each with a reference)")
            if self.target is None:
                raise ValueError("target is required (or give stages)")
            return self
        if not self.stages:
            raise ValueError("stages must not be empty")
        shares = [s.share for s in self.stages]
        if any(s is not None for s in shares):
            if any(s is None for s in shares):
                raise ValueError("stages: give a share for every stage or for none")
            total = sum(shares)  # type: ignore[arg-type]
            if abs(total - 1.0) > 1e-6:
                raise ValueError(f"stages: shares must sum to 1, got {total:g}")
        for i, s in enumerate(self.stages):
            if s.reference is None and self.reference is None:
                raise ValueError(f"stages[{i}].reference is required when there is no top-level reference")
        return self
