"""The seeds' vectors: every row of `largebatch.scaling_rules.published.VECTORS` (the tables the
engine was built from, with source, published value, tolerance and why), one regression test for
each class of wrong answer the engine v1 gave, and the README tables the benchmark writes. Recipes
the engine was not built from are corpus data, scored in test_corpus.py."""

import pytest
from pydantic import ValidationError

from largebatch.scaling_rules import RecipeError, recommend
from largebatch.scaling_rules.published import (
    BERT_ADAMW_REF,
    BERT_LARGE,
    GOYAL_REF,
    LAMB_REF,
    RESNET50,
    VECTORS,
    check,
)


def test_enough_vectors_from_enough_sources():
    assert len(VECTORS) >= 20
    assert len({v.source for v in VECTORS}) >= 6
    # Every tolerance that is not exact says why.
    assert all(v.why for v in VECTORS if v.tolerance not in (None, 1e-9))


@pytest.mark.parametrize("v", VECTORS, ids=[f"{v.source.split(' (')[0]}: {v.case} [{v.quantity}]" for v in VECTORS])
def test_published_recipe(v):
    got = v.value()
    assert check(v, got), f"{v.source}, {v.case}: {v.quantity} published {v.published!r}, engine {got!r} ({v.why})"


def _one(model, ref, target, **extra):
    return recommend({"model": model, "reference": ref, "target": {"batch_size": target}, **extra})


# ------------------------------------------------------------------ the wrong-answer classes of v1


def test_a_cnn_does_not_get_the_bert_cap():
    ref = {"batch_size": 512, "lr": 0.005, "optimizer": "lamb", "warmup_ratio": 0.3125 / 90, "steps": 225_270}
    for target in (8192, 16384, 32768):
        r = _one(RESNET50, ref, target)
        assert r.optimizer.name == "lamb" and r.stages[0].lr_cap is None, target
        assert r.stages[0].peak_lr == pytest.approx(0.005 * (target / 512) ** 0.5)
        assert any("no published LR cap for lamb on a cnn" in x for x in r.rationale)


def test_an_optimizer_switch_reanchors_instead_of_reusing_the_old_units():
    for target, lr in ((16384, 5 / (2**0.5 * 1e3)), (32768, 5e-3)):
        r = _one(BERT_LARGE, BERT_ADAMW_REF, target)
        assert r.optimizer.name == "lamb" and r.stages[0].peak_lr == pytest.approx(lr)
        assert any("re-anchored" in x and "explore" in x for x in r.rationale)
    # An SGD LR is not reused as a LARS LR (linear from 0.1 at 256 would be 12.8): it lands within the
    # corpus's LR band of the TPU reference's 34 at 32K.
    lars = _one(RESNET50, GOYAL_REF, 32768)
    assert lars.optimizer.name == "lars" and 34 / 1.5 <= lars.stages[0].peak_lr <= 34 * 1.5
    assert any("tuned for SGD" in w for w in lars.warnings)


def test_sgd_warmup_stays_five_epochs():
    for target in (1024, 4096, 8192):
        r = _one(RESNET50, GOYAL_REF, target)
        epochs = r.stages[0].warmup_steps * target / (5005 * 256)
        assert epochs == pytest.approx(5, abs=0.01), target
        assert not any("clamped" in w for w in r.warnings)


def test_another_models_lr_moves_by_the_size_law():
    same = _one(BERT_LARGE, LAMB_REF, 32768)
    small_ref = {**LAMB_REF, "model_params": 3_400_000}  # measured on a 100x smaller model
    moved = _one(BERT_LARGE, small_ref, 32768)
    assert moved.stages[0].ideal_lr < same.stages[0].ideal_lr / 5
    assert any("size law" in w for w in moved.warnings)
    assert any("extrapolated" in w for w in moved.warnings)  # 3.4M is below GPT-3's 125M


def test_token_batches_and_seq_len():
    gpt = {"batch_tokens": 2**19, "seq_len": 2048, "lr": 6e-4, "optimizer": "adamw", "steps": 572_205}
    r = recommend({"model": {"params": 125_000_000}, "reference": gpt, "target": {"batch_tokens": 2**21}})
    assert r.optimizer.name == "adamw"  # 2M tokens = 1024 sequences: AdamW, not LANS
    (s,) = r.stages
    assert (s.batch_size, s.batch_tokens, s.steps) == (1024, 2**21, 143_052)
    assert s.peak_lr == pytest.approx(6e-4 * 2)
    # The same batch in sequences gives the same recipe.
    r2 = recommend({"model": {"params": 125_000_000}, "reference": gpt, "target": {"batch_size": 1024}})
    assert r2.stages[0].peak_lr == s.peak_lr and r2.total_steps == r.total_steps
    # A target in tokens with another sequence length is counted in its own sequences.
    r3 = recommend({"model": {"params": 125_000_000}, "reference": gpt,
                    "target": {"batch_tokens": 2**20, "seq_len": 4096}})
    assert r3.stages[0].batch_size == 256 and r3.stages[0].batch_tokens == 2**20
    with pytest.raises(RecipeError, match=r"target.batch_tokens needs a seq_len"):
        recommend({"model": {"params": 125_000_000}, "reference": {**gpt, "seq_len": None, "batch_size": None},
                   "target": {"batch_tokens": 2**21}})


def test_reference_betas_and_eps_pass_through():
    ref = {**BERT_ADAMW_REF, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.1}
    r = _one(BERT_LARGE, ref, 4096)
    assert r.optimizer.betas == (0.9, 0.98) and r.optimizer.eps == 1e-6 and r.optimizer.weight_decay == 0.1
    with pytest.raises(ValidationError, match="betas"):
        _one(BERT_LARGE, {**ref, "betas": [0.9, 1.5]}, 4096)


def test_a_prior_far_outside_its_data_warns():
    r = _one({"params": 10**12}, LAMB_REF, 32768)
    assert any("extrapolated outside its data" in w for w in r.warnings)


def test_explicit_lr_above_the_divergence_boundary_warns():
    r = recommend({"model": BERT_LARGE, "stages": [{"batch_size": 98304, "lr": 0.02, "reference": LAMB_REF}]})
    assert r.stages[0].peak_lr == 0.02
    assert any("above the known divergence boundary" in w for w in r.warnings)


def test_lr_cap_below_a_stable_reference_warns():
    r = _one(BERT_LARGE, LAMB_REF, 512, lr_cap=1e-4)
    assert any("below the reference LR" in w and "check the cap" in w for w in r.warnings)


def test_reference_steps_not_needed_when_target_steps_are_given():
    ref = {k: v for k, v in LAMB_REF.items() if k != "steps"}
    r = recommend({"model": BERT_LARGE, "reference": ref, "target": {"batch_size": 32768, "steps": 15625}})
    assert r.total_steps == 15625 and r.stages[0].warmup_steps == 3125
    with pytest.raises(RecipeError, match=r"reference.steps is required unless target.steps is given"):
        recommend({"model": BERT_LARGE, "reference": ref, "target": {"batch_size": 32768}})


def test_requests_untouched_by_v2_give_the_same_recipe():
    # The README's LAMB Table 4 request, byte for byte what v1 answered (fields added by v2 are None).
    r = _one(BERT_LARGE, LAMB_REF, 32768)
    s = r.stages[0]
    assert (r.optimizer.name, s.peak_lr, s.warmup_steps, s.const_steps, s.decay, r.optimizer.betas) == (
        "lamb", 0.005, 3125, 0, "linear", (0.9, 0.999))
    assert s.batch_tokens is None and s.examples_ratio is None
    # ... and its fingerprint is v1's (engine v1, commit a6a80f6), so stored runs still match it.
    assert r.fingerprint() == "9e5122e3c5ba296c8270f747a7a7dd15194153c72f8476e31eee0bede713e61e"


# ------------------------------------------------------------------ critical batch (issue #11)


def test_noise_scale_predicts_the_cost_of_a_larger_batch():
    req = {"model": BERT_LARGE, "reference": {**LAMB_REF, "noise_scale": 2000}, "target": {"batch_size": 32768}}
    r = recommend(req)
    assert r.stages[0].examples_ratio == pytest.approx(13.8, abs=0.05)
    assert r.stages[0].steps_ratio == pytest.approx(13.84 * 512 / 32768, rel=1e-3)
    assert any("critical batch" in w for w in r.warnings)
    same_loss = recommend({**req, "budget": "same-loss"})
    assert same_loss.total_steps == pytest.approx(15625 * 13.84, rel=1e-3)
    with pytest.raises(RecipeError, match="same-loss"):
        recommend({"model": BERT_LARGE, "reference": LAMB_REF, "target": {"batch_size": 32768}, "budget": "same-loss"})


def test_auto_batch_size_near_the_noise_scale():
    for bn in (300.0, 2000.0, 5000.0, 70000.0):
        r = recommend({"model": BERT_LARGE, "reference": {**LAMB_REF, "noise_scale": bn},
                       "target": {"batch_size": "auto"}})
        assert r.stages[0].batch_size == round(0.2 * bn)  # the default max_overhead: Zhang et al. 2024
        assert any("(auto)" in x for x in r.rationale)
    limited = recommend({"model": BERT_LARGE, "reference": {**LAMB_REF, "noise_scale": 70000.0},
                         "target": {"batch_size": "auto", "max_batch_size": 8192}})
    assert limited.stages[0].batch_size == 8192
    with pytest.raises(RecipeError, match="noise_scale"):
        recommend({"model": BERT_LARGE, "reference": LAMB_REF, "target": {"batch_size": "auto"}})


@pytest.mark.slow  # runs the corpus benchmark, leave-one-source-out included
def test_readme_tables_are_the_scripts_output():
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "published_recipes.py")], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    vectors, corpus_table = out.split("\n| rule | quantity |", 1)
    readme = (root / "README.md").read_text()
    for start, end, text in (("<!-- published-recipes:start -->", "<!-- published-recipes:end -->", vectors),
                             ("<!-- published-corpus:start -->", "<!-- published-corpus:end -->",
                              "| rule | quantity |" + corpus_table)):
        assert start in readme and end in readme, f"README lacks {start}: run benchmarks/published_recipes.py --readme"
        section = readme.split(start, 1)[1].split(end, 1)[0]
        assert section.strip() == text.strip(), "README table is stale: run benchmarks/published_recipes.py --readme"
