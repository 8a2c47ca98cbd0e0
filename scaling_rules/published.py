"""The engine's contract with the papers it was built from, as test vectors: a request built from a
paper's inputs, the value the paper published, and how close the engine must come.

These are the seeds (LAMB Tables 4 and 5, NVIDIA's 64K/32K run, LANS Table 1 and Figure 1), the
rules the engine implements by construction (Goyal's linear rule, timm's formula, Malladi's SDE rule,
McCandlish's eq. 2.11) and a few non-numeric answers (optimizer, betas). Tolerances: ``exact``
(relative 1e-9), or a stated relative tolerance with its reason.

Recipes the engine was *not* built from are data, not vectors: ``corpus.csv``, scored with bands
fixed per quantity by ``largebatch.scaling_rules.corpus``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .engine import recommend
from .models import Recipe

__all__ = ["VECTORS", "Vector", "check", "error"]

EXACT = 1e-9


@dataclass(frozen=True)
class Vector:
    source: str
    case: str
    quantity: str
    published: Any
    request: dict
    get: Callable[[Recipe], Any]
    tolerance: float | None = EXACT  # relative; None for non-numeric values (equality)
    why: str = ""

    def value(self) -> Any:
        return self.get(recommend(self.request))


def check(v: Vector, got: Any) -> bool:
    if v.tolerance is None or isinstance(v.published, str | tuple | bool):
        return got == v.published
    return abs(got - v.published) <= v.tolerance * abs(v.published) + 1e-15


def error(v: Vector, got: Any) -> float | None:
    """Relative error against the published value (None for non-numeric rows)."""
    if v.tolerance is None or isinstance(v.published, str | tuple | bool):
        return None
    return (got - v.published) / v.published


def _lr(i: int = 0) -> Callable[[Recipe], float]:
    return lambda r: r.stages[i].peak_lr


def _warmup_epochs(epochs: float) -> Callable[[Recipe], float]:
    return lambda r: r.stages[0].warmup_ratio * epochs


def _opt(r: Recipe) -> str:
    return r.optimizer.name


# ----------------------------------------------------------------------------------------- sources
LAMB = "LAMB (You et al. 2020)"
NVIDIA = "NVIDIA BERT run_pretraining.sh (LAMB 64K/32K)"
LANS = "LANS (Zheng et al. 2020) Table 1"
GOYAL = "Goyal et al. 2017"
GPT3 = "GPT-3 (Brown et al. 2020) Table 2.1"
ROBERTA = "RoBERTa (Liu et al. 2019) Table 3"
TIMM = "timm train.py (--lr-base, --lr-base-size 256)"
MALLADI = "Malladi et al. 2022 (SDE rule for Adam)"
MCCANDLISH = "McCandlish et al. 2018 eq. 2.11"

BERT_LARGE = {"params": 340_000_000, "family": "transformer"}
BERT_BASE = {"params": 110_000_000, "family": "transformer"}
RESNET50 = {"params": 25_557_032, "family": "cnn"}
LAMB_REF = {"batch_size": 512, "lr": 6.25e-4, "optimizer": "lamb", "warmup_ratio": 1 / 320, "steps": 1_000_000}
# BERT (Devlin et al. 2019): Adam 1e-4, batch 256, 10K warmup steps of 1M.
BERT_ADAMW_REF = {"batch_size": 256, "lr": 1e-4, "optimizer": "adamw", "warmup_steps": 10_000, "steps": 1_000_000}
IMAGENET = 1_281_167
# Goyal et al.: 0.1 at 256, 5 warmup epochs, x0.1 at 30/60/80 of 90 epochs (5005 steps an epoch at 256).
GOYAL_REF = {"batch_size": 256, "lr": 0.1, "optimizer": "sgd", "warmup_ratio": 5 / 90, "steps": 90 * 5005,
             "decay": "step", "decay_milestones": [30 / 90, 60 / 90, 80 / 90], "decay_factor": 0.1}
# LAMB Table 5: 4/(2^3 x 100) at 512, 0.3125 warmup epochs of 90.
LAMB_RESNET_REF = {"batch_size": 512, "lr": 0.005, "optimizer": "lamb", "warmup_ratio": 0.3125 / 90,
                   "steps": 90 * 2503}
# GPT-3 Small: 125M, 0.5M-token batches of 2048-token sequences, Adam (0.9, 0.95), eps 1e-8.
GPT3_SMALL = {"batch_tokens": 2**19, "seq_len": 2048, "lr": 6e-4, "optimizer": "adamw", "betas": [0.9, 0.95],
              "eps": 1e-8, "weight_decay": 0.1, "steps": 572_205, "model_params": 125_000_000}


def _gpt3(params: int, tokens: int) -> dict:
    return {"model": {"params": params}, "reference": GPT3_SMALL, "target": {"batch_tokens": tokens}}


def _t(model: dict, ref: dict, target: int, **extra) -> dict:
    return {"model": model, "reference": ref, "target": {"batch_size": target}, **extra}



VECTORS: list[Vector] = [
    # LAMB Table 4: BERT-Large 512 -> 32K, sqrt LR, linear-epoch warmup (the seed table: exact).
    *[Vector(LAMB, f"Table 4, BERT-Large LAMB 512 -> {b // 1024}K", "peak LR", 5 / (2**x * 1e3),
             _t(BERT_LARGE, LAMB_REF, b), _lr())
      for b, x in [(1024, 2.5), (4096, 1.5), (16384, 0.5), (32768, 0.0)]],
    Vector(LAMB, "Table 4, BERT-Large LAMB 512 -> 32K", "warmup ratio", 1 / 5, _t(BERT_LARGE, LAMB_REF, 32768),
           lambda r: r.stages[0].warmup_ratio),
    Vector(LAMB, "Table 1/4, BERT-Large LAMB 512 -> 32K", "steps", 15625, _t(BERT_LARGE, LAMB_REF, 32768),
           lambda r: r.total_steps),
    # NVIDIA's two-phase LAMB (the 64K/32K mixed-batch run): its own references, its own batches.
    Vector(NVIDIA, "phase 1 + 2 (64K seq 128, 32K seq 512)", "optimizer", "lamb",
           {"model": BERT_LARGE, "stages": [
               {"batch_size": 65536, "seq_len": 128, "reference": {"batch_size": 65536, "lr": 6e-3, "warmup_ratio": 0.2843,
                                                                  "steps": 7038}},
               {"batch_size": 32768, "seq_len": 512, "reference": {"batch_size": 32768, "lr": 4e-3, "warmup_ratio": 0.128,
                                                                  "steps": 1563}}]}, _opt, None),
    # LANS Table 1 stage 1: sqrt from NVIDIA's 64K point, capped at 0.00675, warmup x1.5, 70% plateau.
    *[Vector(LANS, "stage 1, 64K -> 96K with cap 0.00675", q, pub, {"model": BERT_LARGE, "stages": [
        {"batch_size": 98304, "seq_len": 128, "steps": 3519, "lr_cap": 0.00675, "plateau_ratio": 0.7,
         "reference": {"batch_size": 65536, "lr": 6e-3, "warmup_ratio": 0.2843, "steps": 7038}}]}, get)
      for q, pub, get in [("optimizer", "lans", _opt), ("warmup steps", 1500, lambda r: r.stages[0].warmup_steps),
                          ("constant steps", 963, lambda r: r.stages[0].const_steps)]],
    # LAMB Table 5: ResNet-50 with untuned LAMB, 512 -> 32K (no BERT cap on a CNN, no switch to LANS).
    Vector(LAMB, "Table 5, ResNet-50 LAMB 512 -> 32K", "optimizer", "lamb", _t(RESNET50, LAMB_RESNET_REF, 32768),
           _opt, None),
    *[Vector(LAMB, f"Table 5, ResNet-50 LAMB 512 -> {b // 1024}K", "peak LR", 4 / (2**x * 100),
             _t(RESNET50, LAMB_RESNET_REF, b), _lr()) for b, x in [(2048, 2.0), (8192, 1.0), (32768, 0.0)]],
    Vector(LAMB, "Table 5, ResNet-50 LAMB 512 -> 32K", "warmup epochs", 20.0, _t(RESNET50, LAMB_RESNET_REF, 32768),
           _warmup_epochs(90)),
    # Goyal et al. 2017: linear LR, constant 5-epoch warmup, step decay.
    Vector(GOYAL, "ResNet-50 SGD 256 -> 1K", "peak LR", 0.4, _t(RESNET50, GOYAL_REF, 1024), _lr()),
    Vector(GOYAL, "ResNet-50 SGD 256 -> 8K", "peak LR", 3.2, _t(RESNET50, GOYAL_REF, 8192), _lr()),
    Vector(GOYAL, "ResNet-50 SGD 256 -> 8K", "warmup epochs", 5.0, _t(RESNET50, GOYAL_REF, 8192),
           _warmup_epochs(90), 2e-3, "whole steps: 782 warmup steps of 14,077 are 4.9998 epochs"),
    Vector(GOYAL, "ResNet-50 SGD 256 -> 8K", "LR in epochs 30-60", 0.32, _t(RESNET50, GOYAL_REF, 8192),
           lambda r: __import__("largebatch.scaling_rules.schedule", fromlist=["lr_at"]).lr_at(r, int(r.total_steps * 45 / 90))),
    Vector(GOYAL, "ResNet-50 SGD 256 -> 8K", "optimizer", "sgd", _t(RESNET50, GOYAL_REF, 8192), _opt, None),
    # GPT-3 Table 2.1 from GPT-3 Small: token batches, other model sizes, AdamW kept, betas kept.
    Vector(GPT3, "Small -> 175B, 3.2M tokens", "optimizer", "adamw", _gpt3(175_000_000_000, 1536 * 2048), _opt, None),
    Vector(GPT3, "Small -> 175B, 3.2M tokens", "betas", (0.9, 0.95), _gpt3(175_000_000_000, 1536 * 2048),
           lambda r: tuple(r.optimizer.betas), None),
    # An AdamW reference switching to LAMB lands on LAMB's own LR (Table 4), not the AdamW LR scaled.
    Vector(LAMB, "BERT-Large AdamW 256 (1e-4) -> 32K", "peak LR", 5e-3, _t(BERT_LARGE, BERT_ADAMW_REF, 32768), _lr()),
    Vector(LAMB, "BERT-Large AdamW 256 (1e-4) -> 32K", "optimizer", "lamb", _t(BERT_LARGE, BERT_ADAMW_REF, 32768),
           _opt, None),
    # RoBERTa Table 3: BERT-base from 256 to 2K and 8K at equal examples.
    Vector(ROBERTA, "BERT-base AdamW 256 -> 2K", "steps", 125_000, _t(BERT_BASE, BERT_ADAMW_REF, 2048),
           lambda r: r.total_steps),
    Vector(ROBERTA, "BERT-base AdamW 256 -> 8K", "steps", 31_000, _t(BERT_BASE, BERT_ADAMW_REF, 8192),
           lambda r: r.total_steps, 0.01, "RoBERTa rounds 31,250 to 31K"),
    # timm's LR scaling from --lr-base at --lr-base-size 256.
    Vector(TIMM, "sgd, lr-base 0.1 @ 256 -> 4096", "peak LR", 1.6,
           _t(RESNET50, {"batch_size": 256, "lr": 0.1, "optimizer": "sgd", "steps": 100_000}, 4096), _lr()),
    Vector(TIMM, "lamb, lr-base 1e-3 @ 256 -> 4096", "peak LR", 4e-3,
           _t(RESNET50, {"batch_size": 256, "lr": 1e-3, "optimizer": "lamb", "steps": 100_000}, 4096), _lr()),
    # Malladi et al.: the SDE rule (kappa = 2, 4) and its validity edge (kappa = 8).
    *[Vector(MALLADI, f"AdamW (0.9, 0.999, 1e-8) x{k}", q, pub,
             _t(BERT_BASE, {"batch_size": 256, "lr": 1e-4, "optimizer": "adamw", "betas": [0.9, 0.999], "eps": 1e-8,
                            "steps": 100_000}, 256 * k, adam_hparams="sde"), get, tol)
      for k, q, pub, get, tol in [
          (2, "betas", (0.8, 0.998), lambda r: tuple(r.optimizer.betas), None),
          (4, "betas", (0.6, 0.996), lambda r: tuple(r.optimizer.betas), None),
          (4, "eps", 5e-9, lambda r: r.optimizer.eps, EXACT),
          (4, "peak LR", 2e-4, _lr(), EXACT),
          (8, "betas (rule invalid: kept)", (0.9, 0.999), lambda r: tuple(r.optimizer.betas), None)]],
    # McCandlish et al.: the examples a larger batch needs, from a measured noise scale (issue #11).
    Vector(MCCANDLISH, "B_noise 2000, 512 -> 32K", "examples ratio", (1 + 32768 / 2000) / (1 + 512 / 2000),
           {"model": BERT_LARGE, "reference": {**LAMB_REF, "noise_scale": 2000}, "target": {"batch_size": 32768}},
           lambda r: r.stages[0].examples_ratio),
]
