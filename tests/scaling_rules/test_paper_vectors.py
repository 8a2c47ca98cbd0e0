"""The papers' tables are test vectors: the engine must reproduce them from the papers' inputs."""

import math

import pytest

from largebatch.scaling_rules import Recipe, recommend
from largebatch.scaling_rules.engine import area_gaps
from largebatch.scaling_rules.schedule import schedule_area

BERT_LARGE = {"params": 340_000_000, "family": "transformer"}
# LAMB paper Table 4 reference: batch 512, LR 5/(2^3 * 10^3), warmup 1/320, 1M steps.
LAMB_REF = {"batch_size": 512, "lr": 5 / (2**3 * 10**3), "optimizer": "lamb",
            "warmup_ratio": 1 / 320, "steps": 1_000_000}

# LAMB Table 4 (untuned sqrt sweep), every column; steps from Table 1 (15625 at 32K).
TABLE4 = [
    # batch, LR = 5/(2^x * 10^3), warmup ratio, total steps
    (512, 5 / (2**3.0 * 1e3), 1 / 320, 1_000_000),
    (1024, 5 / (2**2.5 * 1e3), 1 / 160, 500_000),
    (2048, 5 / (2**2.0 * 1e3), 1 / 80, 250_000),
    (4096, 5 / (2**1.5 * 1e3), 1 / 40, 125_000),
    (8192, 5 / (2**1.0 * 1e3), 1 / 20, 62_500),
    (16384, 5 / (2**0.5 * 1e3), 1 / 10, 31_250),
    (32768, 5 / (2**0.0 * 1e3), 1 / 5, 15_625),
]


@pytest.mark.parametrize(("batch", "lr", "warmup_ratio", "steps"), TABLE4)
def test_lamb_table4_sqrt_sweep(batch, lr, warmup_ratio, steps):
    recipe = recommend({"model": BERT_LARGE, "reference": LAMB_REF, "target": {"batch_size": batch}})
    (stage,) = recipe.stages
    assert recipe.optimizer.name == "lamb"
    assert stage.peak_lr == pytest.approx(lr, rel=1e-12)
    assert stage.warmup_ratio == pytest.approx(warmup_ratio, rel=1e-12)
    assert stage.steps == recipe.total_steps == steps
    # Linear-epoch warmup: the warmup length in steps is the same at every batch size.
    assert stage.warmup_steps == 3125
    assert stage.const_steps == 0
    assert stage.decay_steps == steps - 3125
    assert not any("capped" in w for w in recipe.warnings)


def test_lamb_table1_32k_row():
    recipe = recommend({"model": BERT_LARGE, "reference": LAMB_REF, "target": {"batch_size": 32768}})
    assert (recipe.total_steps, recipe.stages[0].warmup_steps) == (15625, 3125)
    assert any("sqrt" in r and "LAMB" in r for r in recipe.rationale)


NVIDIA_PHASE1 = {"batch_size": 65536, "lr": 6e-3, "optimizer": "lamb", "warmup_ratio": 0.2843, "steps": 7038}
NVIDIA_PHASE2 = {"batch_size": 32768, "lr": 4e-3, "optimizer": "lamb", "warmup_ratio": 0.128, "steps": 1563}


def test_published_two_phase_lamb_bert():
    recipe = recommend({"model": BERT_LARGE, "stages": [
        {"batch_size": 65536, "seq_len": 128, "reference": NVIDIA_PHASE1},
        {"batch_size": 32768, "seq_len": 512, "reference": NVIDIA_PHASE2},
    ]})
    assert recipe.optimizer.name == "lamb"  # 64K/32K mixed batch is LAMB's own result
    p1, p2 = recipe.stages
    assert (p1.batch_size, p1.peak_lr, p1.warmup_ratio, p1.steps, p1.seq_len) == (65536, 6e-3, 0.2843, 7038, 128)
    assert (p2.batch_size, p2.peak_lr, p2.warmup_ratio, p2.steps, p2.seq_len) == (32768, 4e-3, 0.128, 1563, 512)
    assert p1.warmup_steps == math.floor(0.2843 * 7038) and p2.warmup_steps == math.floor(0.128 * 1563)
    assert recipe.total_steps == 7038 + 1563
    assert recipe.warnings == []


LANS_REQUEST = {
    "model": BERT_LARGE,
    "stages": [
        # Stage 1: sqrt from NVIDIA's 64K point is 7.35e-3; the cap 0.00675 binds; warmup 1.5 x 0.2843;
        # warmup + const = 70%.
        {"batch_size": 98304, "seq_len": 128, "reference": NVIDIA_PHASE1, "steps": 3519,
         "lr_cap": 0.00675, "plateau_ratio": 0.7},
        # Stage 2: LR 0.005 as published, warmup 1.5 x 0.128, warmup + const = 30%.
        {"batch_size": 33792, "seq_len": 512, "reference": NVIDIA_PHASE2, "steps": 782,
         "lr": 0.005, "warmup_scale": 1.5, "plateau_ratio": 0.3},
    ],
}


def test_lans_table1():
    recipe = recommend(LANS_REQUEST)
    assert recipe.optimizer.name == "lans"
    s1, s2 = recipe.stages
    assert s1.peak_lr == 0.00675 and s2.peak_lr == 0.005
    # The table prints percentages to two decimals: 1.5 x 28.43% = 42.645% -> "42.65%".
    assert s1.warmup_ratio == pytest.approx(0.4265, abs=5e-5)
    assert s1.const_ratio == pytest.approx(0.2735, abs=5e-5)
    assert s1.warmup_ratio + s1.const_ratio == pytest.approx(0.70)
    assert s2.warmup_ratio == pytest.approx(0.192) and s2.const_ratio == pytest.approx(0.108)
    assert (s1.steps, s2.steps, recipe.total_steps) == (3519, 782, 4301)
    # Figure 1: T = 3519, T_warmup = 1500, T_const = 963.
    assert (s1.warmup_steps, s1.const_steps) == (1500, 963)
    assert s1.ideal_lr == pytest.approx(6e-3 * math.sqrt(1.5))
    assert any("capped" in w for w in recipe.warnings)


def _stage(peak, steps, warmup, const, ideal=None):
    from largebatch.scaling_rules import Stage
    return Stage(batch_size=1, steps=steps, peak_lr=peak, warmup_steps=warmup, const_steps=const,
                 decay_steps=steps - warmup - const, warmup_ratio=warmup / steps, const_ratio=const / steps,
                 ideal_lr=ideal)


def test_lans_area_numbers_from_the_schedule():
    ideal = schedule_area(_stage(0.01, 3519, 1500, 0))
    assert ideal - schedule_area(_stage(0.007, 3519, 1500, 0)) == pytest.approx(5.2785, abs=1e-9)
    assert ideal - schedule_area(_stage(0.007, 3519, 1500, 963)) == pytest.approx(1.908, abs=1e-9)
    assert round(ideal - schedule_area(_stage(0.007, 3519, 1500, 0)), 2) == 5.28
    assert round(ideal - schedule_area(_stage(0.007, 3519, 1500, 963)), 2) == 1.91


def test_engine_picks_lans_constant_phase_when_the_cap_binds():
    """Ideal 0.01 (32K -> 128K by sqrt), cap 0.007, T = 3519, warmup 1500: the engine's own area rule
    (equal area, keeping LANS's 30% decay tail) chooses 963 constant steps and reports 1.91 vs 5.28."""
    recipe = recommend({"model": BERT_LARGE,
                        "stages": [{"batch_size": 131072, "steps": 3519, "warmup_scale": 1500 / 3519 / 0.1,
                                    "reference": {"batch_size": 32768, "lr": 0.005, "warmup_ratio": 0.1,
                                                  "steps": 14076}}],
                        "lr_cap": 0.007})
    (s,) = recipe.stages
    assert (s.peak_lr, s.ideal_lr, s.warmup_steps, s.const_steps) == (0.007, pytest.approx(0.01), 1500, 963)
    gap, gap_without = area_gaps(s)
    assert (round(gap, 2), round(gap_without, 2)) == (1.91, 5.28)
    assert any("1.908" in r and "5.278" in r for r in recipe.rationale)


def test_constant_phase_restores_full_area_when_there_is_room():
    recipe = recommend({"model": BERT_LARGE, "reference": LAMB_REF, "target": {"batch_size": 32768},
                        "lr_cap": 0.0045})
    (s,) = recipe.stages
    assert s.peak_lr == 0.0045
    assert s.const_steps == round(15625 * (0.005 / 0.0045 - 1))
    gap, _ = area_gaps(s)
    assert abs(gap) < 0.0045  # within one step's worth of LR
    assert recipe.optimizer.name == "lans"


def test_recipe_round_trips_json():
    recipe = recommend(LANS_REQUEST)
    assert Recipe.model_validate_json(recipe.model_dump_json()) == recipe
    assert recipe.fingerprint() == Recipe.model_validate_json(recipe.model_dump_json()).fingerprint()
