"""Constants from the papers, each with its source. The engine reads these; tests pin them.

Sources: LAMB = You et al., ICLR 2020 (../shared/papers/lamb-you-et-al-2020.txt);
LANS = Zheng et al. 2020 (lans-zheng-et-al-2020.txt); GPT-3 = Brown et al. 2020, Table 2.1
(log-log fit in shared/research/scaling.md section 2.5); Goyal = Goyal et al. 2017, "Accurate,
Large Minibatch SGD"; LARS TPU = the LARS schedule of the TensorFlow TPU ResNet-50 reference
(models/official/resnet/lars_util.py: LR 25 / 5 warmup epochs up to 16K, 34 / 12 at 32K, 41 / 16
beyond, polynomial decay of power 2); BERT = Devlin et al. 2019 (Adam 1e-4, batch 256, 10K warmup
of 1M steps); Malladi = Malladi et al. 2022, the SDE scaling rule for Adam.

Priors are keyed by (family, optimizer): no family borrows another's cap or LR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .optimizers import same_units as same_units  # LR units: the optimizer table (re-exported)

# --- LR cap prior (LANS section 3.3: "the learning rate is theoretically upper bounded by 1/L") ---
# BERT-Large (340M): LANS Figure 1 - the sqrt-scaled 0.01 (LAMB's 32K LR scaled to 128K, the setting
# LANS section 3.3 discusses, not its 96K run) "exceeded the maximum learning rate and results in
# divergence"; 0.007 is used, 0.00725 also trained. LAMB's own 64K/32K run used 6e-3 (NVIDIA's
# run_pretraining.sh), below it. So the layer-wise (LAMB/LANS) cap at 340M is 0.007.
BERT_LARGE_PARAMS = 340_000_000
LAYERWISE_CAP_AT_BERT_LARGE = 0.007
# How the largest usable LR moves with model size: GPT-3's LRs (Table 2.1) fit LR ~ N^-0.305 over
# 125M..175B along GPT-3's own path (its batch grew with the model). The caps follow that trend.
CAP_SIZE_EXPONENT = -0.305
# The tuned LR at a fixed batch against model size: published LLM families trained at one batch fit
# N^-0.35 (corpus.fit_size_exponent, one intercept per family and batch; -0.3498 to two decimals).
# The corpus's scorer overrides this name for leave-one-source-out cross-validation.
SIZE_EXPONENT = -0.35
# AdamW: GPT-3's fit itself, 0.1325 * N^-0.305 (3.3e-4 at 340M).
ADAMW_CAP_COEF = 0.1325

# --- Schedule shape ---
# The largest warmup ratio in a published successful run is LANS stage 1's 42.65%; beyond ~45%
# most of the budget is spent ramping up.
MAX_WARMUP_RATIO = 0.45
# When the cap binds, the constant phase may not eat the decay: LANS keeps warmup + const = 70%,
# i.e. a 30% decay tail, and with that tail the area rule below gives LANS's 963 steps exactly.
MIN_DECAY_TAIL = 0.30
# Warmup when the reference had none, per family, as a fraction of the reference run's examples:
# LAMB/LANS 1/320 (LAMB's 512 reference), AdamW 1% (BERT: 10K of 1M steps), SGD/LARS 5 of Goyal's
# 90 epochs.
DEFAULT_REFERENCE_WARMUP_RATIO = 1 / 320
DEFAULT_WARMUP_RATIO = {"lamb": 1 / 320, "lans": 1 / 320, "adamw": 0.01, "adam": 0.01,
                        "sgd": 5 / 90, "lars": 5 / 90}
# LAMB's linear-epoch warmup (the ratio grows with the batch: constant warmup steps) holds up to the
# largest batch its tables reach: 32K (Tables 4, 5), 64K mixed-batch (section 4.1) and LANS's 96K
# (Table 1, the same rule). Past it the warmup stays at its value there (constant epochs). Below the
# tables' 512, constant warmup steps is what small-batch recipes use too (BERT: 10K steps at 256).
# In sequences (images), the tables' unit.
LAMB_WARMUP_RANGE = (1, 98304)
# LARS warmup in epochs grows as (1 + B/LARS_WARMUP_BATCH): flat well below it (SimCLR, BYOL and MAE's
# linear probe keep 10 epochs from 256 to 16K), about linear in the batch well past it, the shape of
# the examples a unit of progress costs past a critical batch (McCandlish et al. 2018, eq. 2.11). The
# LARS reference codes lengthen it from 16K: 5 -> 12 (TPU) .. 25 (MLPerf) epochs at 32K, 16 at 64K.
# Fitted on the corpus's LARS warmups (corpus.fit_lars_warmup_batch: 13.7K; left out one source at a
# time 7.4K .. 20K); its scorer overrides this name.
LARS_WARMUP_BATCH = 13700.0


def warmup_growth(rule: str, batch: float) -> float:
    """How the warmup ratio grows with the batch at a fixed epoch budget under a family's ``rule`` (the
    optimizer table's ``warmup_rule``), up to a constant: a ratio of two batches' values moves a warmup
    ratio from one to the other. Linear-epoch within LAMB_WARMUP_RANGE and flat outside it; LARS epochs
    as 1 + B/LARS_WARMUP_BATCH; constant epochs or samples not at all."""
    if rule == "linear-epoch":
        lo, hi = LAMB_WARMUP_RANGE
        return min(max(batch, lo), hi)
    if rule == "lars-epochs":
        return 1 + batch / LARS_WARMUP_BATCH
    return 1.0


def warmup_power(rule: str) -> float:
    """``warmup_growth``'s power of the batch where the rule is one (linear-epoch 1, the others 0): the
    prior of the exponent a study's warmup runs fit (the rest of the growth, LARS's 1 + B/B_w, rides along)."""
    return 1.0 if rule == "linear-epoch" else 0.0


# Warmup-stable-decay: the decay takes the last 20% of the run (Hägele et al. 2024's cooldown).
WSD_DECAY_FRACTION = 0.2

# --- Optimizer choice: where a family is known to fail (in sequences per batch, whatever the unit
# typed: Table 8's 16K sequences of BERT fail, GPT-3's 1.5K sequences of 2048 tokens do not) ---
ADAMW_FAILS_AT = 16384  # LAMB Table 8: AdamW "stops scaling at the batch size of 16K" (BERT-Large).
LARS_FAILS_AT_ATTENTION = 16384  # LAMB Table 2: "LARS stops scaling at the batch size of 16K".
SGD_MAX_BATCH = 8192  # Goyal et al. 2017: linear scaling + warmup holds up to 8K on ImageNet.
LAMB_MAX_BATCH = 32768  # LAMB Table 4: sqrt scaling with no loss up to 32K,
LAMB_MAX_BATCH_MIXED = 65536  # and 64K/32K mixed-batch (LAMB section 4.1).
LANS_MAX_BATCH = 98304  # LANS: 96K/33K, the largest batch either paper trained.

# --- Evidence from past runs ---
# "0.01 diverged, 0.007 used" (LANS): stay at or below 0.8 of the smallest LR that diverged.
DIVERGENCE_MARGIN = 0.8


def layerwise_cap(params: int) -> float:
    """Largest stable LAMB/LANS LR for a model of ``params`` parameters (see above)."""
    return LAYERWISE_CAP_AT_BERT_LARGE * (params / BERT_LARGE_PARAMS) ** CAP_SIZE_EXPONENT


def adamw_cap(params: int) -> float:
    return ADAMW_CAP_COEF * params**CAP_SIZE_EXPONENT


def cap_prior(optimizer: str, params: int) -> float | None:
    """The model-size prior for the LR cap; None where no published prior exists (SGD, LARS)."""
    if optimizer in ("lamb", "lans"):
        return layerwise_cap(params)
    if optimizer in ("adamw", "adam"):
        return adamw_cap(params)
    return None


def lans_equal_area_const_steps(ideal_lr: float, lr: float, steps: int) -> float:
    """T_c that makes a capped linear warmup/decay schedule's area equal the uncapped one.

    Area of eq. 9 with a linear decay to 0 is eta * (T + T_c) / 2 (independent of T_w), so equal
    area needs T_c = T * (ideal / capped - 1): 1508.1 for LANS's 0.01 vs 0.007 at T = 3519.
    """
    if not (math.isfinite(ideal_lr) and lr > 0):
        raise ValueError("lr must be > 0")
    return steps * (ideal_lr / lr - 1.0)


# --- Model size ---
# The range of model sizes the size fits were made on (GPT-3: 125M .. 175B).
SIZE_LAW_RANGE = (125_000_000, 175_000_000_000)


def size_law_exponent() -> float:
    """Exponent of the tuned LR vs parameters at a fixed batch (transformers), read at call time."""
    return SIZE_EXPONENT


# --- Adam SDE rule (Malladi et al. 2022): valid while 1 - k (1 - beta1) stays >= 0.5 ---
SDE_MIN_BETA1 = 0.5

# --- The AdamW stability evidence (LAMB Table 8, BERT-Large at 16K): with 5% warmup every LR
# diverged; with 10% warmup 3e-4 diverged and 2e-4 was best (F1 88.54); with 20% warmup 3e-4 trained
# (F1 85.65). So the largest stable LR depends on the warmup: 0.8 x 3e-4 up to 10% warmup, rising to
# 3e-4 (the largest LR tried, so a lower bound on the true limit) at 20%. The evidence is from 16K:
# the cap fades out below it as (1 + (ADAMW_CAP_FADE / B)^2), x2 at 4K, so it has no step.
ADAMW_DIVERGED_AT_16K = 3e-4
ADAMW_WARMUP_SAFE = (0.10, 0.20)
ADAMW_CAP_FADE = 4096


def adamw_table8_cap(batch: float, warmup_ratio: float) -> float:
    """The warmup-aware AdamW cap at BERT-Large size (LAMB Table 8), continuous in both inputs."""
    lo, hi = ADAMW_WARMUP_SAFE
    w = min(max((math.log(max(warmup_ratio, 1e-9)) - math.log(lo)) / (math.log(hi) - math.log(lo)), 0.0), 1.0)
    at16k = DIVERGENCE_MARGIN * ADAMW_DIVERGED_AT_16K * (1 / DIVERGENCE_MARGIN) ** w
    return at16k * (1 + (ADAMW_CAP_FADE / max(batch, 1.0)) ** 2)


# --- Critical batch and compute-optimal laws (token budgets) ---
# Step Law (Li et al. 2025): B_opt = 0.58 D^0.571 tokens, independent of model size; taken as the
# critical-batch prior when only the token budget is known (fitted up to 1B parameters / 100B tokens).
STEP_LAW_BATCH = (0.58, 0.571)
STEP_LAW_TOKENS_RANGE = (1e9, 1e11)
# DeepSeek LLM (Bi et al. 2024): B_opt = 0.2920 C^0.3271 tokens, lr_opt = 0.3118 C^-0.1250 (AdamW,
# C in FLOPs), fitted on C = 1e17..3e20 and checked at their 7B/67B budgets (~1e24).
DEEPSEEK_BATCH = (0.2920, 0.3271)
DEEPSEEK_LR = (0.3118, -0.1250)
DEEPSEEK_COMPUTE_RANGE = (1e17, 3e20)
DEEPSEEK_CHECKED_UP_TO = 1e24


# What the prior's B_noise is, as a multiple of Step Law's B_opt: fitted on the corpus's LLM recipes whose
# batch changes under a stated token budget (corpus.fit_critical_scale, least squares in ln LR, the
# rule averaging its bend over CRITICAL_BATCH_SD as it does in use: 0.039 (0.054 where it took the
# bend as exact, which fits the same rows equally well: squared ln error 2.405 against 2.410);
# left out one source at a time 0.015 .. 0.081 with the size law held, 0.0025 .. 0.24 with it refit too:
# the two trade off, a steeper size law leaving room for a larger batch factor). Their published LRs barely move with the batch (GPT-3,
# OPT, Gopher, Llama 3: the size trend alone accounts for them), which the regime curve reads as a
# batch at or past the critical batch. B_opt is the loss-optimal batch at a fixed budget, a different
# quantity; the corpus's scorer overrides this name for leave-one-source-out cross-validation.
CRITICAL_BATCH_SCALE = 0.039


# How far a critical batch the engine is given is trusted to place the LR's bend: x/÷3 at one sd, as far
# as a streaming statistic is held to agree with a branched one. The rule averages its LR curve over
# this log-normal, and a study's fit takes it as the bend's prior, so runs that say nothing of the bend
# leave the rule's answer where it is.
CRITICAL_BATCH_SD = math.log(3.0)
CRITICAL_BATCH_POINTS = 13  # the log-normal on a grid of +-3 sd
_SPREAD_Z = tuple(-3.0 + 6.0 * i / (CRITICAL_BATCH_POINTS - 1) for i in range(CRITICAL_BATCH_POINTS))
_SPREAD_DENSITY = tuple(math.exp(-z * z / 2) for z in _SPREAD_Z)
_SPREAD_W = tuple(d / math.fsum(_SPREAD_DENSITY) for d in _SPREAD_DENSITY)


def critical_batch_spread(measured: float) -> tuple[tuple[float, float], ...]:
    """The bends a measured critical batch stands for, with their weights (summing to 1)."""
    return tuple((measured * math.exp(z * CRITICAL_BATCH_SD), w) for z, w in zip(_SPREAD_Z, _SPREAD_W, strict=True))


def step_law_batch_tokens(tokens: float) -> float:
    """Step Law's loss-optimal batch (tokens) for a training budget of ``tokens``: B_opt = 0.58 D^0.571."""
    a, b = STEP_LAW_BATCH
    return a * tokens**b


def critical_batch_prior_tokens(tokens: float) -> float:
    """Where the LR stops growing with the batch (tokens) for a budget of ``tokens``: Step Law's B_opt
    scaled by the corpus's fit. A prior for the LR's regime curve, not for what examples cost."""
    return CRITICAL_BATCH_SCALE * step_law_batch_tokens(tokens)


def deepseek_optimum(compute: float) -> tuple[float, float]:
    """(batch in tokens, LR) from DeepSeek LLM's compute-optimal fits."""
    return DEEPSEEK_BATCH[0] * compute ** DEEPSEEK_BATCH[1], DEEPSEEK_LR[0] * compute ** DEEPSEEK_LR[1]


@dataclass(frozen=True)
class Prior:
    """What the literature says about one (family, optimizer): an anchor run and how it scales."""

    family: str
    optimizer: str
    source: str
    params: int  # model size of the anchor
    batch: int  # anchor batch, in sequences (images for CNNs)
    lr: float  # anchor LR
    rule: str  # "sqrt" | "linear"
    warmup: str  # "linear-epoch" | "constant-epoch" | "table"
    warmup_epochs: float  # at the anchor batch
    epochs: float  # of the anchor run (warmup_epochs / epochs is its warmup ratio)
    decay: str
    batch_range: tuple[int, int]
    cap: float | None = None  # largest stable LR at `params`
    cap_source: str = ""
    cap_min_batch: int = 0

    def cap_at(self, params: int) -> float | None:
        if self.cap is None:
            return None
        return self.cap * (params / self.params) ** CAP_SIZE_EXPONENT if self.family == "transformer" else self.cap


# The LARS schedule of the TensorFlow TPU ResNet-50 reference (lars_util.py) is a step function of the
# batch, not a table of measured points: batch <= 16384: LR 25, 5 warmup epochs; exactly 32768: 34 / 12;
# any other batch: 41 / 16. The engine anchors on its first row (the one setting the code uses over a
# range of batches) and reports the code's own setting beside its answer.


def lars_tpu_setting(batch: int) -> tuple[float, float]:
    """(LR, warmup epochs) that the TPU reference code uses at ``batch`` (its branches verbatim)."""
    if batch <= 16384:
        return 25.0, 5.0
    if batch == 32768:
        return 34.0, 12.0
    return 41.0, 16.0


RESNET50_PARAMS = 25_557_032
PRIORS: dict[tuple[str, str], Prior] = {
    ("transformer", "lamb"): Prior(
        "transformer", "lamb", "LAMB Table 4 (BERT-Large, batch 512, LR 6.25e-4, sqrt + linear-epoch warmup); "
        "cap: LANS section 3.3 / Figure 1", BERT_LARGE_PARAMS, 512, 6.25e-4, "sqrt", "linear-epoch",
        1 / 320, 1.0, "linear", (512, 65536), LAYERWISE_CAP_AT_BERT_LARGE,
        "LANS section 3.3 / Figure 1: the 128K-scaled 0.01 diverged, 0.007 trained (BERT-Large)"),
    ("transformer", "lans"): Prior(
        "transformer", "lans", "LANS Table 1 (BERT-Large with LAMB's LRs: 6e-3 at 64K, 6.75e-3 at 96K); "
        "anchor LAMB Table 4", BERT_LARGE_PARAMS, 512, 6.25e-4, "sqrt", "linear-epoch", 1 / 320, 1.0, "linear",
        (512, 98304), LAYERWISE_CAP_AT_BERT_LARGE,
        "LANS section 3.3 / Figure 1: the 128K-scaled 0.01 diverged, 0.007 trained (BERT-Large)"),
    ("transformer", "adamw"): Prior(
        "transformer", "adamw", "BERT (Devlin et al. 2019: Adam 1e-4 at batch 256, 1% warmup); "
        "cap: LAMB Table 8", BERT_LARGE_PARAMS, 256, 1e-4, "sqrt", "linear-epoch", 0.01, 1.0, "linear",
        (256, 16384), DIVERGENCE_MARGIN * ADAMW_DIVERGED_AT_16K,
        "LAMB Table 8 (BERT-Large at 16K): 3e-4 diverged with 5% and 10% warmup and trained with 20%; "
        f"{DIVERGENCE_MARGIN} x that up to 10% warmup, 3e-4 from 20%, fading out below 16K"),
    ("cnn", "sgd"): Prior(
        "cnn", "sgd", "Goyal et al. 2017 (ResNet-50: 0.1 x batch/256, 5 warmup epochs at every batch, "
        "x0.1 at epochs 30/60/80 of 90)", RESNET50_PARAMS, 256, 0.1, "linear", "constant-epoch", 5, 90, "step",
        (256, 8192)),
    ("cnn", "lars"): Prior(
        "cnn", "lars", "LARS TPU reference code (ResNet-50: LR 25 with 5 warmup epochs for every batch up to "
        "16K; a step function, 34 / 12 at exactly 32K, 41 / 16 otherwise; polynomial decay, power 2)",
        RESNET50_PARAMS, 16384, 25.0, "sqrt", "constant-epoch", 5, 90, "polynomial", (16384, 65536)),
    ("cnn", "lamb"): Prior(
        "cnn", "lamb", "LAMB Table 5 (ResNet-50: 4/(2^3 x 100) = 0.005 at 512, sqrt LR, 0.3125 warmup epochs "
        "x the batch ratio, 90 epochs)", RESNET50_PARAMS, 512, 0.005, "sqrt", "linear-epoch", 0.3125, 90, "linear",
        (512, 32768)),
}
PRIORS[("transformer", "adam")] = PRIORS[("transformer", "adamw")]
PRIORS[("cnn", "lans")] = PRIORS[("cnn", "lamb")]


def prior_for(family: str, optimizer: str) -> Prior | None:
    return PRIORS.get((family, optimizer))




def canonical(optimizer: str) -> str:
    """The recipe optimizer a reference optimizer is run as (Adam is run as AdamW: same LR units)."""
    return "adamw" if optimizer == "adam" else optimizer
