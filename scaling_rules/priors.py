"""Constants from the papers, each with its source. The engine reads these; tests pin them.

Sources: LAMB = You et al., ICLR 2020 (../shared/papers/lamb-you-et-al-2020.txt);
LANS = Zheng et al. 2020 (lans-zheng-et-al-2020.txt); GPT-3 = Brown et al. 2020, Table 2.1
(log-log fit in shared/research/scaling.md section 2.5).
"""

from __future__ import annotations

import math

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
