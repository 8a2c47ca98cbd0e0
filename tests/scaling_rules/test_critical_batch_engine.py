"""The critical batch in the engine: "auto" at an accepted examples overhead, the examples cost
integrated over a B_noise trajectory, and the batch ramp that follows it."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from largebatch.scaling_rules import RecipeError, recommend
from largebatch.scaling_rules._critical import Trajectory, ramp_batches
from largebatch.scaling_rules.models import Reference
from largebatch.scaling_rules.priors import step_law_batch_tokens
from largebatch.scaling_rules.schedule import lr_at

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODEL = {"params": 350_000_000}
REF = {"batch_size": 256, "seq_len": 512, "lr": 2e-4, "optimizer": "adamw", "steps": 100_000,
       "warmup_ratio": 0.02}
# B_noise along the reference run: small early, ~10x larger at the end (the LM in the issue).
TRAJ = [{"examples_seen": x, "noise_scale": b}
        for x, b in [(0.0, 60.0), (1e6, 150.0), (5e6, 300.0), (1.5e7, 500.0), (2.56e7, 676.0)]]


def _auto(bn: float, **target) -> int:
    r = recommend({"model": MODEL, "reference": {**REF, "noise_scale": bn}, "target": {"batch_size": "auto", **target}})
    return r.stages[0].batch_size


def test_auto_accepts_twenty_percent_more_examples_by_default():
    r = recommend({"model": MODEL, "reference": {**REF, "noise_scale": 5000.0}, "target": {"batch_size": "auto"}})
    assert r.stages[0].batch_size == 1000  # 0.2 x B_noise: E(B)/E_min = 1.2
    text = next(x for x in r.rationale if "(auto)" in x)
    assert "max_overhead 0.2" in text and "Zhang et al. 2024" in text and "1.2x" in text
    assert _auto(5000.0, max_overhead=1.0) == 5000  # the old "auto": examples 2x their minimum
    assert _auto(5000.0, max_overhead=0.05) == 250
    assert _auto(5000.0, max_overhead=0.2, max_batch_size=512) == 512


@pytest.mark.parametrize("bad", [0, -0.2, math.inf, math.nan, 101.0, True, "0.2"])
def test_bad_max_overhead_names_the_field(bad):
    with pytest.raises(ValidationError, match="max_overhead"):
        recommend({"model": MODEL, "reference": {**REF, "noise_scale": 500.0},
                   "target": {"batch_size": "auto", "max_overhead": bad}})


def test_max_overhead_with_a_fixed_batch_is_refused():
    with pytest.raises(ValidationError, match="max_overhead"):
        recommend({"model": MODEL, "reference": REF, "target": {"batch_size": 1024, "max_overhead": 0.2}})


@FAST
@given(st.floats(0.01, 50.0), st.floats(1e-6, 1e-3), st.floats(1.0, 5.0))
def test_auto_is_continuous_and_monotone_in_max_overhead(overhead, rel, log_bn):
    bn = 10.0**log_bn
    a, b = _auto(bn, max_overhead=overhead), _auto(bn, max_overhead=overhead * (1 + rel))
    assert a <= b <= a + overhead * rel * bn + 1
    assert abs(a - overhead * bn) <= 0.5 or a == 1


def _loss(traj=None, batch=4096, **ref) -> object:
    reference = {**REF, **ref}
    if traj is not None:
        reference["noise_trajectory"] = traj
    return recommend({"model": MODEL, "reference": reference, "target": {"batch_size": batch}, "budget": "same-loss"})


def test_a_constant_trajectory_is_the_constant():
    const = _loss(noise_scale=300.0)
    flat = _loss([{"examples_seen": 0.0, "noise_scale": 300.0}, {"examples_seen": 1e7, "noise_scale": 300.0}])
    one = _loss([{"tokens_seen": 5e8, "noise_scale": 300.0}])
    for r in (flat, one):
        assert r.total_steps == const.total_steps
        assert r.stages[0].peak_lr == pytest.approx(const.stages[0].peak_lr, rel=1e-12)
        assert r.stages[0].examples_ratio == pytest.approx(const.stages[0].examples_ratio, rel=1e-12)


def test_the_integral_is_the_average_cost_over_the_reference_run():
    r = _loss(TRAJ)
    x = np.linspace(0.0, REF["steps"] * REF["batch_size"], 400_001)
    bn = np.interp(x, [p["examples_seen"] for p in TRAJ], [p["noise_scale"] for p in TRAJ])
    pointwise = (1 + 4096 / bn) / (1 + 256 / bn)
    expected = float(np.mean((pointwise[1:] + pointwise[:-1]) / 2))
    assert r.stages[0].examples_ratio == pytest.approx(expected, rel=1e-6)
    assert r.total_steps == math.ceil(100_000 / 16 * expected - 1e-9)
    # One constant at the last (largest) B_noise, what a store keeping the latest value gives, says far less.
    last = _loss(noise_scale=676.0)
    assert r.stages[0].examples_ratio > 1.3 * last.stages[0].examples_ratio
    text = next(x for x in r.rationale if "along the run" in x)
    assert "eq. 2.11" in text and "last B_noise (676)" in text


def test_tokens_seen_are_read_in_sequences_of_the_reference():
    in_tokens = [{"tokens_seen": p["examples_seen"] * 512, "noise_scale": p["noise_scale"]} for p in TRAJ]
    assert _loss(in_tokens).stages[0].examples_ratio == pytest.approx(_loss(TRAJ).stages[0].examples_ratio, rel=1e-12)


@pytest.mark.parametrize("traj, field", [
    ([], "noise_trajectory"),
    ([{"examples_seen": float(i), "noise_scale": 1.0} for i in range(1025)], "noise_trajectory"),
    ([{"examples_seen": 2.0, "noise_scale": 10.0}, {"examples_seen": 1.0, "noise_scale": 20.0}], "sorted"),
    ([{"examples_seen": 1.0, "noise_scale": 10.0}, {"examples_seen": 1.0, "noise_scale": 20.0}], "sorted"),
    ([{"examples_seen": 1.0, "noise_scale": -10.0}], "noise_scale"),
    ([{"examples_seen": 1.0, "noise_scale": math.inf}], "noise_scale"),
    ([{"examples_seen": -1.0, "noise_scale": 10.0}], "examples_seen"),
    ([{"noise_scale": 10.0}], "examples_seen or tokens_seen"),
    ([{"examples_seen": 1.0, "tokens_seen": 512.0, "noise_scale": 10.0}], "examples_seen or tokens_seen"),
    ([{"examples_seen": 1.0, "noise_scale": 10.0}, {"tokens_seen": 1e6, "noise_scale": 20.0}], "every point"),
    ([{"examples_seen": 1.0, "noise_scale": 10.0, "noise_scale_low": 20.0}], "noise_scale_low"),
])
def test_bad_trajectories_name_the_field(traj, field):
    with pytest.raises(ValidationError, match=field):
        _loss(traj)


def test_a_trajectory_and_a_constant_are_not_both_given():
    with pytest.raises(ValidationError, match="noise_trajectory"):
        _loss(TRAJ, noise_scale=300.0)
    with pytest.raises(ValidationError, match="seq_len"):
        _loss([{"tokens_seen": 1e6, "noise_scale": 20.0}], seq_len=None)


@FAST
@given(st.integers(0, len(TRAJ) - 1), st.floats(-1e-4, 1e-4), st.sampled_from([512, 4096, 65536]))
def test_the_examples_ratio_is_continuous_in_every_point(i, rel, batch):
    moved = [dict(p) for p in TRAJ]
    moved[i]["noise_scale"] *= 1 + rel
    a, b = _loss(TRAJ, batch).stages[0].examples_ratio, _loss(moved, batch).stages[0].examples_ratio
    assert abs(b / a - 1) <= 2 * abs(rel) + 1e-12
    if 0 < i < len(TRAJ) - 1:
        shifted = [dict(p) for p in TRAJ]
        shifted[i]["examples_seen"] *= 1 + rel
        c = _loss(shifted, batch).stages[0].examples_ratio
        assert abs(c / a - 1) <= 2 * abs(rel) + 1e-12


def test_auto_with_a_trajectory_uses_its_constant():
    r = recommend({"model": MODEL, "reference": {**REF, "noise_trajectory": TRAJ}, "target": {"batch_size": "auto"}})
    eq = _loss(TRAJ)
    b_eq = float(next(x for x in eq.rationale if "B_eq = " in x).split("B_eq = ")[1].split()[0])
    assert r.stages[0].batch_size == round(0.2 * b_eq)
    assert b_eq < 676.0 / 1.5  # well below the last value: the early, small B_noise weighs most


# A ramp driven by the lower bound while B_noise itself stays far above the batch: the LR then moves by
# the regime rule's small-batch limit, sqrt x per doubling (Adam family) or 2x (SGD).
RAMP_TRAJ = [{"examples_seen": x, "noise_scale": 1e7, "noise_scale_low": low}
             for x, low in [(0.0, 100.0), (4e6, 400.0), (1.2e7, 1000.0), (2.56e7, 3000.0)]]


def _ramp(optimizer="adamw", traj=RAMP_TRAJ, **target):
    ref = {**REF, "optimizer": optimizer, "noise_trajectory": traj}
    return recommend({"model": {"params": 10**8, "family": "other"}, "reference": ref,
                      "target": {"batch_size": "ramp", "max_overhead": 1.0, "min_batch_size": 64, **target}})


def test_the_ramp_doubles_where_the_lower_bound_passes_twice_the_batch():
    r = _ramp()
    assert [s.batch_size for s in r.stages] == [64, 128, 256, 512, 1024, 2048]
    traj = Trajectory.of(Reference.model_validate({**REF, "noise_trajectory": RAMP_TRAJ}))
    stages = ramp_batches(traj, 64, 2**30, 1.0)
    for (prev, _, _), (batch, lo, _) in itertools.pairwise(stages):
        assert batch == 2 * prev and traj.at(lo, low=True) == pytest.approx(batch, rel=1e-12)
    # Same examples as the reference (budget same-epochs), each stage its share of the run.
    examples = sum(s.steps * s.batch_size for s in r.stages)
    assert 0 <= examples - REF["steps"] * REF["batch_size"] <= sum(s.batch_size for s in r.stages)
    assert [s.warmup_steps > 0 for s in r.stages] == [True] + [False] * 5  # no re-warmup
    # One run-level decay from the end of the warmup: every later stage carries a piece, only the last ends at 0.
    assert all(s.decay_steps == s.steps for s in r.stages[1:])
    assert r.stages[-1].end_lr == 0 and all(s.end_lr > 0 for s in r.stages[1:-1])
    assert any("batch ramp 64 -> 128" in x for x in r.rationale)
    capped = _ramp(max_batch_size=300)
    assert [s.batch_size for s in capped.stages] == [64, 128, 256]


@pytest.mark.parametrize("optimizer, per_doubling", [("adamw", math.sqrt(2)), ("sgd", 2.0)])
def test_the_lr_moves_with_the_batch_by_the_regime_rule(optimizer, per_doubling):
    r = _ramp(optimizer)
    run = sum(s.steps * s.batch_size for s in r.stages)
    decay_from = r.stages[0].steps * r.stages[0].batch_size  # the warmup ends with stage 1 here (capped)
    step = examples = 0
    for prev, nxt in itertools.pairwise(r.stages):
        step, examples = step + prev.steps, examples + prev.steps * prev.batch_size
        before, after = lr_at(r, step - 1), lr_at(r, step)
        # The last step before the doubling ends at `examples`, the first after it at one batch more: the
        # run's linear decay moves the LR by that one step besides the rule's factor.
        one_step = (run - examples - nxt.batch_size) / (run - examples) if examples >= decay_from else 1.0
        assert after / before == pytest.approx(per_doubling * one_step, rel=1e-3)


def test_a_ramp_needs_a_trajectory_and_plans_its_own_steps():
    with pytest.raises(RecipeError, match="noise_trajectory"):
        recommend({"model": MODEL, "reference": {**REF, "noise_scale": 500.0}, "target": {"batch_size": "ramp"}})
    with pytest.raises(RecipeError, match=r"target\.steps"):
        _ramp(steps=1000)


def test_a_ramp_at_same_loss_pays_each_stage_at_its_own_critical_batch():
    traj = [{"examples_seen": p["examples_seen"], "noise_scale": p["noise_scale"]} for p in TRAJ]
    r = recommend({"model": MODEL, "reference": {**REF, "noise_trajectory": traj}, "budget": "same-loss",
                   "target": {"batch_size": "ramp", "max_overhead": 1.0, "min_batch_size": 64}})
    assert [s.batch_size for s in r.stages] == [64, 128, 256, 512]
    fixed = recommend({"model": MODEL, "reference": {**REF, "noise_trajectory": traj}, "budget": "same-loss",
                       "target": {"batch_size": 512}})
    ramp_examples = sum(s.steps * s.batch_size for s in r.stages)
    # The ramp spends fewer examples than the final batch from the start, in more (but not 8x more) steps.
    assert ramp_examples < sum(s.steps * s.batch_size for s in fixed.stages)
    assert fixed.total_steps < r.total_steps < 8 * fixed.total_steps


def test_without_a_trajectory_a_ramp_follows_the_token_budget_prior():
    tokens = REF["steps"] * REF["batch_size"] * REF["seq_len"]  # the reference's run
    r = recommend({"model": MODEL, "reference": REF, "target": {"batch_size": "ramp", "tokens": float(tokens),
                                                                 "min_batch_size": 16, "max_overhead": 1.0}})
    batches = [s.batch_size for s in r.stages]
    assert batches == [16 * 2**i for i in range(len(batches))] and len(batches) >= 3
    # Each doubling where the prior (Step Law's B_opt, in sequences) reaches it: the final batch is at most
    # the prior at the whole budget, and twice it would pass it.
    full = step_law_batch_tokens(tokens) / REF["seq_len"]
    assert batches[-1] <= full < 2 * batches[-1]
    assert any("a prior, not a measurement" in x for x in r.rationale)


def test_a_ramp_stage_is_capped_for_the_warmup_its_run_had():
    # AdamW near LAMB Table 8's 16K: the cap depends on the warmup. The later stages are not warmed up
    # again, but they train on the first stage's warmup, so their cap is that warmup's, not a zero one's.
    traj = [{"examples_seen": 0.0, "noise_scale": 1e7, "noise_scale_low": 1000.0},
            {"examples_seen": 2.56e7, "noise_scale": 1e7, "noise_scale_low": 40000.0}]
    ref = {**REF, "lr": 1e-4, "warmup_ratio": 0.2, "noise_trajectory": traj}
    r = recommend({"model": MODEL, "reference": ref, "optimizer": "adamw",
                   "target": {"batch_size": "ramp", "min_batch_size": 2048, "max_overhead": 1.0,
                              "max_batch_size": 16384}})
    n = len(r.stages)
    assert r.stages[-1].batch_size == 16384 and r.stages[-1].warmup_steps == 0
    line = next(x for x in r.rationale if x.startswith(f"stage {n}:") and "at warmup ratio" in x)
    # The warmup's share of the run's examples, not of the first stage's steps.
    run_ratio = r.stages[0].warmup_steps * r.stages[0].batch_size / sum(s.steps * s.batch_size for s in r.stages)
    assert f"at warmup ratio {run_ratio:.6g} and batch {r.stages[-1].batch_size}" in line, line


@FAST
@given(st.lists(st.floats(1.0, 1e5), min_size=1, max_size=12), st.floats(0.05, 2.0), st.integers(1, 64))
def test_the_ramp_doubles_at_the_first_crossing_of_any_trajectory(lows, overhead, start):
    traj = Trajectory(seen=tuple(float(i) for i in range(len(lows))), noise=tuple(lows), low=tuple(lows),
                      end=float(max(len(lows) - 1, 1)))
    stages = ramp_batches(traj, start, 2**20, overhead)
    assert stages[0][1] == 0.0 and stages[-1][2] == traj.end
    for (prev, _, hi), (batch, lo, _) in itertools.pairwise(stages):
        assert batch == 2 * prev and hi == lo
        assert overhead * traj.at(lo, low=True) >= batch * (1 - 1e-9)
        # nothing earlier in the stage already passed it: the first crossing
        for x in np.linspace(0.0, lo, 50)[:-1]:
            assert overhead * traj.at(float(x), low=True) < batch * (1 + 1e-9) or x < 1e-12


def test_a_token_budget_prior_bends_the_lr_and_predicts_no_examples_cost():
    # The prior's scale is fitted to how published LRs move with the batch: past it the warning says the LR
    # stops growing and that the examples cost needs a measurement; a measured noise scale predicts the cost.
    target = {"batch_size": 65536, "tokens": float(REF["steps"] * REF["batch_size"] * REF["seq_len"])}
    prior = recommend({"model": MODEL, "reference": REF, "target": target})
    measured = recommend({"model": MODEL, "reference": {**REF, "noise_scale": 2000.0}, "target": target})
    past = [w for w in prior.warnings if "LR-regime batch of the token-budget prior" in w]
    assert past and "measure the noise scale" in past[0] and "predicts no examples cost" in past[0]
    assert all(s.examples_ratio is None for s in prior.stages)
    assert not any("the critical batch" in w for w in prior.warnings)
    assert any("the critical batch" in w and "the examples" in w for w in measured.warnings)
    assert measured.stages[0].examples_ratio is not None
