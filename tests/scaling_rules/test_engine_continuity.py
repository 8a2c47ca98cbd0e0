"""The engine is one continuous model: properties over random valid requests (hypothesis).

Continuity (a one-sequence change of the target batch moves the LR < 5% and the warmup in samples
< 50% within one optimizer), unit invariance (sequences + seq_len == tokens), identity (target ==
reference returns the reference), round trips (A -> B -> A) and monotone steps in the batch.
"""

import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from largebatch.scaling_rules import recommend
from largebatch.scaling_rules.models import Recipe
from largebatch.scaling_rules.schedule import lr_at

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

log_lr = st.floats(-5, 1).map(lambda e: 10.0**e)


@st.composite
def references(draw, optimizer=None):
    ref = {"batch_size": 2 ** draw(st.integers(4, 16)), "lr": draw(log_lr),
           "optimizer": optimizer or draw(st.sampled_from(["lamb", "lans", "adamw", "adam", "lars", "sgd"])),
           "steps": draw(st.integers(2_000, 1_000_000)),
           "warmup_ratio": draw(st.floats(0.001, 0.3))}
    if draw(st.booleans()):
        ref["seq_len"] = draw(st.sampled_from([128, 512, 2048]))
    if draw(st.booleans()):
        ref["noise_scale"] = draw(st.floats(1, 6)).__rpow__(10)
    if draw(st.booleans()):
        ref["weight_decay"] = draw(st.floats(0.001, 0.1))
    if draw(st.booleans()):
        ref["decay"] = draw(st.sampled_from(["linear", "cosine", "polynomial", "step", "multistep", "wsd"]))
    return ref


@st.composite
def requests(draw, optimizer=None):
    return {"model": {"params": 10 ** draw(st.integers(6, 11)),
                      "family": draw(st.sampled_from(["transformer", "cnn", "other"]))},
            "reference": draw(references(optimizer)),
            "budget": draw(st.sampled_from(["same-epochs", "same-steps"])),
            "weight_decay_rule": draw(st.sampled_from(["keep", "timescale"]))}


def _with_target(req: dict, **target) -> Recipe:
    return recommend({**req, "target": target})


def _warmup_samples(r: Recipe) -> float:
    s = r.stages[0]
    return s.warmup_ratio * s.steps * s.batch_size  # the continuous quantity (warmup_steps is its floor)


@FAST
@given(requests(), st.integers(100, 300_000))
def test_one_more_sequence_moves_nothing_far(req, batch):
    a, b = _with_target(req, batch_size=batch), _with_target(req, batch_size=batch + 1)
    if a.optimizer.name != b.optimizer.name:
        return  # a switch: re-anchored in the new optimizer's units, said in the rationale
    assert abs(b.stages[0].peak_lr / a.stages[0].peak_lr - 1) < 0.05
    wa, wb = _warmup_samples(a), _warmup_samples(b)
    assert wa > 0 and abs(wb / wa - 1) < 0.5
    assert a.stages[0].decay == b.stages[0].decay


@FAST
@given(requests(), st.integers(100, 300_000), st.floats(1e8, 1e13))
def test_model_size_and_token_budget_move_nothing_far(req, batch, tokens):
    """The other continuous inputs: 0.1% more parameters, 0.1% more tokens in the budget."""
    req["reference"]["model_params"] = req["model"]["params"]
    req["reference"].pop("noise_scale", None)
    base = _with_target(req, batch_size=batch, tokens=tokens)
    for other in (recommend({**req, "model": {**req["model"], "params": int(req["model"]["params"] * 1.001)},
                             "target": {"batch_size": batch, "tokens": tokens}}),
                  _with_target(req, batch_size=batch, tokens=tokens * 1.001)):
        if other.optimizer.name != base.optimizer.name:
            continue
        assert abs(other.stages[0].peak_lr / base.stages[0].peak_lr - 1) < 0.05
        assert abs(_warmup_samples(other) / _warmup_samples(base) - 1) < 0.5


@FAST
@given(requests(), st.integers(1, 300_000))
def test_the_unit_typed_does_not_matter(req, batch):
    ref = req["reference"]
    assume("seq_len" in ref)
    seqs = _with_target(req, batch_size=batch)
    tokens = _with_target(req, batch_tokens=batch * ref["seq_len"])
    ref_in_tokens = {**{k: v for k, v in ref.items() if k != "batch_size"},
                     "batch_tokens": ref["batch_size"] * ref["seq_len"]}
    both = recommend({**req, "reference": ref_in_tokens, "target": {"batch_size": batch}})
    for r in (tokens, both):
        assert r.optimizer == seqs.optimizer
        for s, t in zip(r.stages, seqs.stages, strict=True):
            assert (s.batch_size, s.steps, s.warmup_steps, s.const_steps, s.decay) == \
                   (t.batch_size, t.steps, t.warmup_steps, t.const_steps, t.decay)
            assert math.isclose(s.peak_lr, t.peak_lr, rel_tol=1e-12)


@FAST
@given(requests())
def test_a_target_equal_to_the_reference_returns_the_reference(req):
    ref = req["reference"]
    r = _with_target(req, batch_size=ref["batch_size"])
    canonical = "adamw" if ref["optimizer"] == "adam" else ref["optimizer"]
    assert r.optimizer.name == canonical
    (s,) = r.stages
    assert s.peak_lr == ref["lr"] and s.steps == ref["steps"]
    assert s.warmup_ratio == round(ref["warmup_ratio"], 12)
    assert s.decay == ref.get("decay", s.decay)
    if "weight_decay" in ref:
        assert r.optimizer.weight_decay == ref["weight_decay"]
    assert not any("capped" in w for w in r.warnings)


@FAST
@given(requests(), st.integers(16, 200_000))
def test_a_to_b_to_a_comes_back(req, batch):
    ref = req["reference"]
    opt = "adamw" if ref["optimizer"] == "adam" else ref["optimizer"]
    req = {**req, "optimizer": opt, "budget": "same-epochs"}
    there = _with_target(req, batch_size=batch)
    (s,) = there.stages
    assume(s.peak_lr == s.ideal_lr)  # a cap is a boundary, not a transfer
    assume(500 <= s.steps < 2**31 - 1)  # whole steps: a run of a few steps cannot carry the reference's length back
    assume(not any("clamped" in w for w in there.warnings))  # the warmup clamp is a boundary too
    back_ref = {**ref, "batch_size": batch, "lr": s.peak_lr, "warmup_ratio": s.warmup_ratio, "steps": s.steps,
                "optimizer": opt}
    if "noise_scale" in ref:
        back_ref["noise_scale"] = ref["noise_scale"]  # the same B_noise, in sequences
    back = recommend({**req, "reference": back_ref, "target": {"batch_size": ref["batch_size"]}})
    (b,) = back.stages
    assume(b.peak_lr == b.ideal_lr)
    assert math.isclose(b.peak_lr, ref["lr"], rel_tol=1e-9)
    # Steps are whole numbers: the round trip comes back within the rounding of two ceilings.
    k = batch / ref["batch_size"]
    assert abs(b.steps - ref["steps"]) <= 1 + k
    assert math.isclose(b.warmup_ratio * b.steps, ref["warmup_ratio"] * ref["steps"], rel_tol=0.01, abs_tol=1 + k)


@FAST
@given(requests(), st.integers(1, 100_000), st.integers(1, 100_000),
       st.sampled_from(["same-epochs", "same-loss"]))
def test_steps_fall_as_the_batch_grows(req, b1, b2, budget):
    if budget == "same-loss" and "noise_scale" not in req["reference"]:
        req["reference"]["noise_scale"] = 1000.0
    req = {**req, "budget": budget}
    lo, hi = sorted((b1, b2))
    small, large = _with_target(req, batch_size=lo), _with_target(req, batch_size=hi)
    assert large.total_steps <= small.total_steps
    assert large.total_steps * hi >= small.total_steps * lo * (1 - 1e-9) - hi  # never fewer examples


def test_the_bert_thresholds_are_gone():
    """Issue's first finding: BERT AdamW 256 -> 8191 vs 8192 vs 8193."""
    ref = {"batch_size": 256, "lr": 1e-4, "optimizer": "adamw", "warmup_steps": 10_000, "steps": 1_000_000,
           "seq_len": 128}
    model = {"params": 340_000_000}
    r = {b: recommend({"model": model, "reference": ref, "target": {"batch_size": b}}) for b in (8191, 8192, 8193)}
    assert {x.optimizer.name for x in r.values()} == {"adamw"}
    assert abs(r[8192].stages[0].peak_lr / r[8191].stages[0].peak_lr - 1) < 1e-3
    assert abs(_warmup_samples(r[8193]) / _warmup_samples(r[8192]) - 1) < 1e-3
    # AdamW keeps its warmup in samples: 10,000 steps of 256 = 2.56M sequences at every batch.
    assert math.isclose(_warmup_samples(r[8192]), 2_560_000, rel_tol=1e-3)
    # Past Table 8's 16K the free choice is LAMB, with the warmup still in samples at the switch.
    switched = recommend({"model": model, "reference": ref, "target": {"batch_size": 16384}})
    kept = recommend({"model": model, "reference": ref, "target": {"batch_size": 16383}})
    assert (kept.optimizer.name, switched.optimizer.name) == ("adamw", "lamb")
    assert abs(_warmup_samples(switched) / _warmup_samples(kept) - 1) < 1e-3
    assert any("Nado" in x and "Table 8" in x for x in switched.rationale)


def test_sequences_and_tokens_give_one_optimizer():
    """Issue's second finding: BERT seq-128 at 16,384 sequences == 2,097,152 tokens."""
    ref = {"batch_size": 256, "lr": 1e-4, "optimizer": "adamw", "warmup_ratio": 0.01, "steps": 1_000_000,
           "seq_len": 128}
    a = recommend({"model": {"params": 340_000_000}, "reference": ref, "target": {"batch_size": 16384}})
    b = recommend({"model": {"params": 340_000_000}, "reference": ref, "target": {"batch_tokens": 16384 * 128}})
    assert a.optimizer == b.optimizer and a.stages == b.stages


def test_a_working_adamw_recipe_at_32k_is_kept():
    ref = {"batch_size": 32768, "lr": 2e-3, "optimizer": "adamw", "warmup_ratio": 0.1, "steps": 10_000}
    r = recommend({"model": {"params": 340_000_000}, "reference": ref, "target": {"batch_size": 32768}})
    assert (r.optimizer.name, r.stages[0].peak_lr, r.stages[0].warmup_ratio) == ("adamw", 2e-3, 0.1)


def test_sgd_without_warmup_gets_goyal_five_epochs():
    ref = {"batch_size": 256, "lr": 0.1, "optimizer": "sgd", "steps": 450_000}  # 90 epochs of ImageNet
    r = recommend({"model": {"params": 25_500_000, "family": "cnn"}, "reference": ref,
                   "target": {"batch_size": 8192}})
    s = r.stages[0]
    epochs = s.warmup_ratio * s.steps * s.batch_size / (450_000 * 256 / 90)
    assert math.isclose(epochs, 5, rel_tol=1e-3)
    assert any("Goyal" in w for w in r.warnings)


def test_regime_limits_and_the_critical_batch_warning():
    base = {"model": {"params": 340_000_000}, "budget": "same-epochs"}
    lamb = {"batch_size": 512, "lr": 1e-3, "optimizer": "lamb", "warmup_ratio": 0.01, "steps": 100_000}
    sgd = {**lamb, "optimizer": "sgd", "lr": 0.1}
    # Far below B_noise: sqrt / linear; far beyond: flat.
    for ref, low in ((lamb, 2.0), (sgd, 4.0)):
        below = recommend({**base, "optimizer": ref["optimizer"], "reference": {**ref, "noise_scale": 1e9},
                           "target": {"batch_size": 2048}})
        assert math.isclose(below.stages[0].peak_lr / ref["lr"], low, rel_tol=1e-5)
        beyond = recommend({**base, "optimizer": ref["optimizer"], "reference": {**ref, "noise_scale": 0.1},
                            "target": {"batch_size": 2048}})
        assert math.isclose(beyond.stages[0].peak_lr / ref["lr"], 1.0, rel_tol=2e-3)
        assert any("critical batch" in w and "worse loss" in w for w in beyond.warnings)
    # With none known the rationale says which regime it assumed and why.
    plain = recommend({**base, "reference": lamb, "target": {"batch_size": 2048}})
    assert any("regime assumed" in x for x in plain.rationale)


def test_lamb_warmup_is_linear_epoch_only_across_its_tables():
    ref = {"batch_size": 65536, "lr": 6e-3, "optimizer": "lans", "warmup_ratio": 0.2, "steps": 7000}
    at = {b: recommend({"model": {"params": 340_000_000}, "reference": ref, "lr_cap": 1.0,
                        "target": {"batch_size": b}}).stages[0] for b in (98304, 131072, 262144)}
    assert math.isclose(at[98304].warmup_ratio, 0.3)  # x1.5 inside LANS Table 1's range
    assert at[131072].warmup_ratio == at[262144].warmup_ratio == at[98304].warmup_ratio  # flat beyond 96K


def test_ramp_stages_continue_and_seq_len_changes_rewarm():
    ref = {"batch_size": 256, "lr": 6e-4, "optimizer": "adamw", "warmup_ratio": 0.01, "steps": 100_000,
           "seq_len": 2048}
    r = recommend({"model": {"params": 125_000_000}, "reference": ref, "stages": [
        {"batch_size": 256, "share": 0.1}, {"batch_size": 512, "share": 0.9}]})
    s1, s2 = r.stages
    # One run-level schedule: the decay starts after the warmup, in stage 1, and the doubling moves the LR up
    # by the regime rule from where the decay has brought it, without a re-warmup.
    assert s2.warmup_steps == 0 and lr_at(r, s1.steps) > lr_at(r, s1.steps - 1) > 0
    assert s1.decay_steps > 0 and s1.end_lr > 0 and s2.end_lr == 0
    rewarm = recommend({"model": {"params": 125_000_000}, "reference": ref, "stages": [
        {"batch_size": 256, "share": 0.5}, {"batch_size": 512, "share": 0.5, "seq_len": 4096}]})
    assert rewarm.stages[1].warmup_steps > 0


def test_weight_decay_timescale():
    ref = {"batch_size": 256, "lr": 1e-4, "optimizer": "adamw", "warmup_ratio": 0.01, "steps": 100_000,
           "weight_decay": 0.1}
    req = {"model": {"params": 100_000_000}, "reference": ref, "target": {"batch_size": 1024}}
    kept = recommend(req)
    assert kept.optimizer.weight_decay == 0.1 and any("tau" in x and "x 2" in x for x in kept.rationale)
    moved = recommend({**req, "weight_decay_rule": "timescale"})
    assert math.isclose(moved.optimizer.weight_decay, 0.1 * 4 / 2)  # batch x4, LR x2 (sqrt)


def test_width_and_compute_budget():
    ref = {"batch_size": 512, "lr": 1e-3, "optimizer": "adamw", "warmup_ratio": 0.01, "steps": 10_000,
           "model_width": 256, "seq_len": 2048}
    r = recommend({"model": {"params": 10**9, "width": 1024}, "reference": ref, "target": {"batch_size": 512}})
    assert math.isclose(r.stages[0].peak_lr, 2.5e-4)  # muP: LR ~ 1/width
    shared = recommend({"model": {"params": 12_000_000, "shared_weights": True},
                        "reference": {**ref, "model_width": None, "model_params": 18_000_000},
                        "target": {"batch_size": 512}})
    assert any("shares weights" in w for w in shared.warnings)
    # DeepSeek LLM 7B: C ~ 8.6e22 FLOPs gives ~9.2M tokens and ~4.25e-4 (their 9.4M / 4.2e-4).
    auto = recommend({"model": {"params": 7 * 10**9}, "reference": {**ref, "model_width": None},
                      "target": {"batch_size": "auto", "compute": 8.6e22}})
    assert 4.0e-4 < auto.stages[0].peak_lr < 4.5e-4 and 4000 < auto.stages[0].batch_size < 5000


@FAST
@given(requests(), st.lists(st.integers(64, 100_000), min_size=2, max_size=3), st.sampled_from([128, 512, 2048]))
def test_stages_written_in_either_unit_agree(req, batches, seq_len):
    req = {k: v for k, v in req.items() if k != "budget"}
    req["reference"] = {**req["reference"], "seq_len": seq_len}
    share = 1 / len(batches)
    shares = [share] * (len(batches) - 1) + [1 - share * (len(batches) - 1)]
    seqs = recommend({**req, "stages": [{"batch_size": b, "share": s} for b, s in zip(batches, shares, strict=True)]})
    toks = recommend({**req, "stages": [{"batch_tokens": b * seq_len, "share": s}
                                        for b, s in zip(batches, shares, strict=True)]})
    assert toks.optimizer == seqs.optimizer
    for a, b in zip(toks.stages, seqs.stages, strict=True):
        assert (a.batch_size, a.steps, a.warmup_steps, a.const_steps, a.decay_steps) == \
               (b.batch_size, b.steps, b.warmup_steps, b.const_steps, b.decay_steps)
        assert math.isclose(a.peak_lr, b.peak_lr, rel_tol=1e-12)


@settings(max_examples=300, deadline=None)
@given(ref=st.floats(1.0, 1e5), k=st.floats(1e-3, 1e5), n=st.floats(1e-3, 1e5), rule=st.sampled_from(["sqrt", "linear"]))
def test_the_averaged_bend_keeps_the_rules_limits_and_stays_near_the_exact_bend(ref, k, n, rule):
    """The regime factor averages ln f over the spread a given B_noise stands for: monotone in the batch,
    1 at the reference, the papers' power far below the bend and flat far beyond it, and within 7% (sqrt) /
    15% (linear) of the factor that takes B_noise as exact."""
    from largebatch.scaling_rules._lr import regime_factor

    assume(abs(math.log(k)) > 1e-6)  # a batch a rounding away from the reference's has the factor 1 either side
    e = 0.5 if rule == "sqrt" else 1.0
    batch, noise = ref * k, ref * n
    got = regime_factor(batch, ref, noise, rule)
    exact = ((1 + noise / ref) / (1 + noise / batch)) ** e
    assert abs(math.log(got / exact)) <= math.log(1.07 if rule == "sqrt" else 1.15)
    assert (got >= 1) == (batch >= ref)
    assert regime_factor(batch * 1.5, ref, noise, rule) > got
    # far below every bend of the spread: the papers' power; far beyond it: flat
    assert regime_factor(batch, ref, 1e9 * max(batch, ref), rule) == pytest.approx(k**e, rel=1e-6)
    assert regime_factor(batch, ref, 1e-9 * min(batch, ref), rule) == pytest.approx(1.0, rel=1e-6)
