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

import itertools
import math
from dataclasses import dataclass

# --- LR cap prior (LANS section 3.3: "the learning rate is theoretically upper bounded by 1/L") ---
# BERT-Large (340M): LANS Figure 1 - the ideal 0.01 "exceeded the maximum learning rate and results
# in divergence", 0.007 is used, 0.00725 also trained. LAMB's own 64K/32K run used 6e-3 (NVIDIA's
# run_pretraining.sh), below it. So the layer-wise (LAMB/LANS) cap at 340M is 0.007.
BERT_LARGE_PARAMS = 340_000_000
LAYERWISE_CAP_AT_BERT_LARGE = 0.007
# How the largest usable LR moves with model size: GPT-3's LRs (Table 2.1) fit LR ~ N^-0.305 over
# 125M..175B. That is the only published size trend across three orders of magnitude, so the cap is
# anchored on BERT-Large and follows the same exponent.
SIZE_EXPONENT = -0.305
# AdamW: GPT-3's fit itself, 0.1325 * N^-0.305 (3.3e-4 at 340M). LAMB Table 8 agrees: AdamW at 16K
# diverged at 3e-4 with 5% and 10% warmup.
ADAMW_CAP_COEF = 0.1325

# --- Schedule shape ---
# The largest warmup ratio in a published successful run is LANS stage 1's 42.65%; beyond ~45%
# most of the budget is spent ramping up.
MAX_WARMUP_RATIO = 0.45
# When the cap binds, the constant phase may not eat the decay: LANS keeps warmup + const = 70%,
# i.e. a 30% decay tail, and with that tail the area rule below gives LANS's 963 steps exactly.
MIN_DECAY_TAIL = 0.30
# When the reference run had no warmup at all; LAMB's 512 reference used 1/320.
DEFAULT_REFERENCE_WARMUP_RATIO = 1 / 320

# --- Optimizer choice thresholds (in sequences per batch) ---
ADAMW_MAX_BATCH = 8192  # LAMB Table 8: AdamW "stops scaling at the batch size of 16K".
LARS_MAX_BATCH_ATTENTION = 8192  # LAMB Table 2: "LARS stops scaling at the batch size of 16K".
SGD_MAX_BATCH = 8192  # Goyal et al. 2017: linear scaling + warmup holds up to 8K on ImageNet.
LAMB_MAX_BATCH = 32768  # LAMB Table 4: sqrt scaling with no loss up to 32K,
LAMB_MAX_BATCH_MIXED = 65536  # and 64K/32K mixed-batch (LAMB section 4.1).
LANS_MAX_BATCH = 98304  # LANS: 96K/33K, the largest batch either paper trained.

# --- Evidence from past runs ---
# "0.01 diverged, 0.007 used" (LANS): stay at or below 0.8 of the smallest LR that diverged.
DIVERGENCE_MARGIN = 0.8


def layerwise_cap(params: int) -> float:
    """Largest stable LAMB/LANS LR for a model of ``params`` parameters (see above)."""
    return LAYERWISE_CAP_AT_BERT_LARGE * (params / BERT_LARGE_PARAMS) ** SIZE_EXPONENT


def adamw_cap(params: int) -> float:
    return ADAMW_CAP_COEF * params**SIZE_EXPONENT


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


# --- Model size (issue #10) ---
# GPT-3 Table 2.1 fits: LR ~ N^-0.305 and batch ~ N^0.303 tokens, along GPT-3's own path where the
# batch grew with the model. Away from that path the batch rule applies, so at a fixed batch the
# size law is N^(-0.305 - 0.303/2) for sqrt-rule optimizers and N^(-0.305 - 0.303) for linear ones.
GPT3_BATCH_EXPONENT = 0.303
# The range of model sizes the GPT-3 fit was made on: 125M .. 175B.
SIZE_LAW_RANGE = (125_000_000, 175_000_000_000)


def size_law_exponent(rule: str) -> float:
    """Exponent of LR vs parameters at a fixed batch (transformers; see above)."""
    return SIZE_EXPONENT - GPT3_BATCH_EXPONENT * (0.5 if rule == "sqrt" else 1.0)


# --- Token batches ---
# GPT-3 trained AdamW at up to 3.2M tokens per batch (175B): where a request counts its batch in
# tokens (a decoder LM), AdamW is kept up to there; BERT's 8K-sequence limit (Table 8) applies to
# batches counted in sequences.
ADAMW_MAX_TOKENS = 3_200_000

# --- Adam SDE rule (Malladi et al. 2022): valid while 1 - k (1 - beta1) stays >= 0.5 ---
SDE_MIN_BETA1 = 0.5

# --- The AdamW stability evidence (LAMB Table 8): at 16K, BERT-Large, AdamW diverged at 3e-4 with
# 5% and 10% warmup (and at every LR with 5%); 2e-4 with 10% warmup was the best (F1 88.54).
ADAMW_DIVERGED_AT_16K = 3e-4
ADAMW_CAP_MIN_BATCH = 8192  # the evidence is from 16K; below 8K no AdamW cap prior is known


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
    # (batch, LR, warmup epochs) points of a published schedule table, interpolated log-log.
    table: tuple[tuple[int, float, float], ...] = ()

    def cap_at(self, params: int) -> float | None:
        if self.cap is None:
            return None
        return self.cap * (params / self.params) ** SIZE_EXPONENT if self.family == "transformer" else self.cap

    def lr_at(self, batch: float) -> float:
        """The anchor's LR scaled to ``batch`` (table points where the source has them)."""
        if self.table:
            return _interp(self.table, batch, 1)
        k = batch / self.batch
        return self.lr * (math.sqrt(k) if self.rule == "sqrt" else k)

    def warmup_epochs_at(self, batch: float) -> float:
        if self.table:
            return _interp(self.table, batch, 2)
        if self.warmup == "linear-epoch":
            return self.warmup_epochs * batch / self.batch
        return self.warmup_epochs


def _interp(table: tuple[tuple[int, float, float], ...], batch: float, col: int) -> float:
    """Log-log interpolation between table points; flat below the first (the TPU code uses its first
    row for every smaller batch) and sqrt-extrapolated (LR) or flat (warmup) beyond the last."""
    if batch <= table[0][0]:
        return table[0][col]
    for (b0, *v0), (b1, *v1) in itertools.pairwise(table):
        if batch <= b1:
            x0, x1, y0, y1 = math.log(b0), math.log(b1), math.log(v0[col - 1]), math.log(v1[col - 1])
            return math.exp(y0 + (y1 - y0) * (math.log(batch) - x0) / (x1 - x0))
    last = table[-1]
    return last[col] * math.sqrt(batch / last[0]) if col == 1 else last[col]


RESNET50_PARAMS = 25_557_032
PRIORS: dict[tuple[str, str], Prior] = {
    ("transformer", "lamb"): Prior(
        "transformer", "lamb", "LAMB Table 4 (BERT-Large, batch 512, LR 6.25e-4, sqrt + linear-epoch warmup); "
        "cap: LANS section 3.3 / Figure 1", BERT_LARGE_PARAMS, 512, 6.25e-4, "sqrt", "linear-epoch",
        1 / 320, 1.0, "linear", (512, 65536), LAYERWISE_CAP_AT_BERT_LARGE,
        "LANS section 3.3: 0.01 diverged at 96K, 0.007 trained (BERT-Large)"),
    ("transformer", "lans"): Prior(
        "transformer", "lans", "LANS Table 1 (BERT-Large with LAMB's LRs: 6e-3 at 64K, 6.75e-3 at 96K); "
        "anchor LAMB Table 4", BERT_LARGE_PARAMS, 512, 6.25e-4, "sqrt", "linear-epoch", 1 / 320, 1.0, "linear",
        (512, 98304), LAYERWISE_CAP_AT_BERT_LARGE,
        "LANS section 3.3: 0.01 diverged at 96K, 0.007 trained (BERT-Large)"),
    ("transformer", "adamw"): Prior(
        "transformer", "adamw", "BERT (Devlin et al. 2019: Adam 1e-4 at batch 256, 1% warmup); "
        "cap: LAMB Table 8", BERT_LARGE_PARAMS, 256, 1e-4, "sqrt", "linear-epoch", 0.01, 1.0, "linear",
        (256, 16384), DIVERGENCE_MARGIN * ADAMW_DIVERGED_AT_16K,
        f"LAMB Table 8: AdamW diverged at {ADAMW_DIVERGED_AT_16K:g} at 16K (BERT-Large); "
        f"{DIVERGENCE_MARGIN} x that", ADAMW_CAP_MIN_BATCH),
    ("cnn", "sgd"): Prior(
        "cnn", "sgd", "Goyal et al. 2017 (ResNet-50: 0.1 x batch/256, 5 warmup epochs at every batch, "
        "x0.1 at epochs 30/60/80 of 90)", RESNET50_PARAMS, 256, 0.1, "linear", "constant-epoch", 5, 90, "step",
        (256, 8192)),
    ("cnn", "lars"): Prior(
        "cnn", "lars", "LARS TPU reference schedule (ResNet-50: LR 25 / 5 warmup epochs to 16K, 34 / 12 at 32K, "
        "41 / 16 at 64K; polynomial decay, power 2)", RESNET50_PARAMS, 16384, 25.0, "sqrt", "table", 5, 90,
        "polynomial", (16384, 65536), table=((16384, 25.0, 5.0), (32768, 34.0, 12.0), (65536, 41.0, 16.0))),
    ("cnn", "lamb"): Prior(
        "cnn", "lamb", "LAMB Table 5 (ResNet-50: 4/(2^3 x 100) = 0.005 at 512, sqrt LR, 0.3125 warmup epochs "
        "x the batch ratio, 90 epochs)", RESNET50_PARAMS, 512, 0.005, "sqrt", "linear-epoch", 0.3125, 90, "linear",
        (512, 32768)),
}
PRIORS[("transformer", "adam")] = PRIORS[("transformer", "adamw")]
PRIORS[("cnn", "lans")] = PRIORS[("cnn", "lamb")]


def prior_for(family: str, optimizer: str) -> Prior | None:
    return PRIORS.get((family, optimizer))


# Optimizers whose LRs are in the same units (LANS trained with LAMB's LRs; Adam and AdamW agree).
_UNITS = {"lamb": "layerwise-adam", "lans": "layerwise-adam", "adamw": "adam", "adam": "adam",
          "sgd": "sgd", "lars": "lars"}


def same_units(a: str, b: str) -> bool:
    return _UNITS[a] == _UNITS[b]
