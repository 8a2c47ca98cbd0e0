"""The rules beyond the paper tables: optimizer choice, caps, warmup clamps, budgets, history."""

import pytest

from largebatch.scaling_rules import BatchSummary, recommend

from .test_paper_vectors import BERT_LARGE, LAMB_REF

ADAMW_REF = {"batch_size": 256, "lr": 1e-4, "optimizer": "adamw", "warmup_ratio": 0.01, "steps": 100_000}


def _one(target, **kw):
    return recommend({"model": kw.pop("model", BERT_LARGE), "reference": kw.pop("reference", LAMB_REF),
                      "target": {"batch_size": target}, **kw})


def test_adamw_kept_below_16k_and_replaced_beyond():
    assert _one(4096, reference=ADAMW_REF).optimizer.name == "adamw"
    big = _one(16384, reference={**ADAMW_REF, "lr": 2e-5})
    assert big.optimizer.name == "lamb"
    assert any("Table 8" in r for r in big.rationale)
    assert any("tuned for AdamW" in w for w in big.warnings)
    # Issue #10: the switch re-anchors on LAMB's own prior (LAMB Table 4: 5/(2^0.5 x 10^3) at 16K); the
    # AdamW LR in LAMB's units (1e-4 x sqrt(64) = 8e-4, capped and so LANS) was the old wrong answer.
    switched = _one(16384, reference=ADAMW_REF)
    assert switched.optimizer.name == "lamb"
    assert switched.stages[0].peak_lr == pytest.approx(5 / (2**0.5 * 1e3))
    assert any("re-anchored" in r for r in switched.rationale)
    # Capped at a batch where AdamW still works: AdamW stays, below LAMB Table 8's divergence (3e-4
    # at 16K with 1% warmup: 0.8 x 3e-4), the cap fading in below 16K (x1.25 at 8K), with LANS's
    # constant phase.
    kept = _one(8192, reference=ADAMW_REF)
    assert kept.optimizer.name == "adamw"
    assert kept.stages[0].peak_lr == pytest.approx(0.8 * 3e-4 * 1.25) and kept.stages[0].const_steps > 0


def test_adamw_cap_follows_table8_warmup():
    """LAMB Table 8 at 16K: 3e-4 diverged with 10% warmup and trained with 20%: the cap is 0.8 x 3e-4
    up to 10% warmup and 3e-4 from 20%, not a warmup-blind limit."""
    def at(ratio):
        return _one(16384, optimizer="adamw", reference={**ADAMW_REF, "warmup_ratio": ratio}).stages[0]
    assert at(0.10).peak_lr == pytest.approx(0.8 * 3e-4 * (1 + 0.25**2))
    assert at(0.21).peak_lr == pytest.approx(3e-4 * (1 + 0.25**2))  # 20% of the run in samples, and more
    assert at(0.10).peak_lr < at(0.14).peak_lr < at(0.20).peak_lr


def test_forced_adamw_at_32k_warns():
    recipe = _one(32768, optimizer="adamw")
    assert recipe.optimizer.name == "adamw"
    assert any("16K" in w for w in recipe.warnings)


def test_lans_beyond_32k_single_stage():
    recipe = _one(65536)
    assert recipe.optimizer.name == "lans"


def test_cnn_linear_rule_sgd_then_lars():
    ref = {"batch_size": 256, "lr": 0.1, "optimizer": "sgd", "warmup_ratio": 0.05, "steps": 450_000}
    model = {"params": 25_500_000, "family": "cnn"}
    small = _one(8192, model=model, reference=ref)
    assert small.optimizer.name == "sgd"
    assert small.stages[0].peak_lr == pytest.approx(3.2)  # Goyal et al.: 0.1 x 8192/256
    big = _one(32768, model=model, reference=ref)
    assert big.optimizer.name == "lars"
    assert big.optimizer.momentum == 0.9


def test_model_size_prior_caps_small_models_less():
    small = _one(65536, model={"params": 10_000_000})
    large = _one(65536, model={"params": 10_000_000_000})
    assert small.stages[0].lr_cap > large.stages[0].lr_cap
    assert large.stages[0].peak_lr == large.stages[0].lr_cap  # capped
    assert large.stages[0].const_steps > 0


def test_warmup_ratio_is_clamped_with_a_warning():
    recipe = _one(32768, lr_cap=1.0, reference={**LAMB_REF, "warmup_ratio": 0.2})  # 0.2 x 64 = 12.8
    assert recipe.stages[0].warmup_ratio == 0.45
    assert any("clamped" in w for w in recipe.warnings)


def test_same_steps_budget():
    recipe = _one(32768, budget="same-steps")
    assert recipe.total_steps == 1_000_000


def test_shares_split_reference_steps():
    recipe = recommend({"model": BERT_LARGE, "reference": LAMB_REF, "stages": [
        {"batch_size": 65536, "share": 0.9, "seq_len": 128}, {"batch_size": 32768, "share": 0.1, "seq_len": 512}]})
    assert [s.steps for s in recipe.stages] == [7032, 1563]  # 900K x 512/64K, 100K x 512/32K


def test_history_divergence_caps_the_lr():
    history = [BatchSummary(batch_size=16384, n_runs=2, n_diverged=1, min_diverged_lr=0.004)]
    recipe = recommend({"model": BERT_LARGE, "reference": LAMB_REF, "target": {"batch_size": 32768}},
                       history=history)
    assert recipe.stages[0].peak_lr == pytest.approx(0.8 * 0.004)
    assert any("diverged at batch 16384" in r for r in recipe.rationale)


def test_divergence_at_a_larger_batch_does_not_cap():
    history = [BatchSummary(batch_size=65536, n_runs=1, n_diverged=1, min_diverged_lr=0.004)]
    recipe = recommend({"model": BERT_LARGE, "reference": LAMB_REF, "target": {"batch_size": 32768}},
                       history=history)
    assert recipe.stages[0].peak_lr == pytest.approx(0.005)


def test_deterministic():
    a = _one(32768).model_dump_json()
    assert all(_one(32768).model_dump_json() == a for _ in range(3))


def test_the_tpu_lars_settings_are_a_step_function():
    """The TPU reference code's branches (lars_util.py), not points to interpolate between."""
    from largebatch.scaling_rules.priors import lars_tpu_setting
    assert lars_tpu_setting(8192) == lars_tpu_setting(16384) == (25.0, 5.0)
    assert lars_tpu_setting(32768) == (34.0, 12.0)
    assert lars_tpu_setting(20000) == lars_tpu_setting(65536) == (41.0, 16.0)  # "else": every other batch
    model = {"params": 25_500_000, "family": "cnn"}
    ref = {"batch_size": 256, "lr": 0.1, "optimizer": "sgd", "warmup_ratio": 5 / 90, "steps": 450_000}
    r = _one(32768, model=model, reference=ref)
    assert any("would use LR 34 with 12 warmup epochs" in x for x in r.rationale)


def test_the_lans_cap_evidence_is_the_128k_setting():
    r = _one(131072)
    assert any("128K-scaled 0.01 diverged" in x for x in r.rationale)
