"""The learning fit is robust to any stored value (issue 13): whatever the evidence holds, it gives a
finite fit with optima inside the LR limits, or none (the rule stays in charge); it never raises."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from largebatch.scaling_rules.engine import recommend
from largebatch.scaling_rules.learning import EvidenceModel, RunEvidence
from largebatch.scaling_rules.models import MAX_LR, MIN_LR, RecommendationRequest

REQUEST = RecommendationRequest.model_validate({
    "model": {"params": 340_000_000},
    "reference": {"batch_size": 512, "lr": 6.25e-4, "warmup_ratio": 0.003125, "steps": 100_000},
    "target": {"batch_size": 8192},
})

metrics = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e155, -1e308, 1.7e308, 5e-324]))
runs = st.lists(st.builds(
    RunEvidence,
    batch_size=st.sampled_from([256, 512, 1024, 8192, 2**31 - 1]),
    lr=st.one_of(st.floats(min_value=1e-300, max_value=1e300), st.sampled_from([1e-4, 2e-4, 4e-4, 8e-4])),
    outcome=st.sampled_from(["completed", "completed", "diverged"]),
    metric=metrics,
    warmup_ratio=st.one_of(st.none(), st.floats(min_value=1e-300, max_value=1.0)),
    run_id=st.integers(0, 1000),
), max_size=12)


@pytest.mark.slow  # 300 generated evidence sets; the full run keeps them
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(runs, st.sampled_from(["minimize", "maximize"]))
def test_any_evidence_gives_a_usable_fit_or_none(evidence, direction):
    model = EvidenceModel.from_runs(evidence, direction=direction)
    if model.fit is not None:
        for b in (1, 512, 8192, 2**31 - 1):
            assert MIN_LR <= model.fit.optimum(b) <= MAX_LR
    if model.warmup_fit is not None:
        assert 0 < model.warmup_fit.ratio(8192) <= 1


def test_one_huge_metric_leaves_the_rule_in_charge():
    """The issue's case: a U-shaped sweep plus one completed run with metric 1e155."""
    sweep = [RunEvidence(batch_size=b, lr=lr, outcome="completed", metric=2.0 + (math.log(lr / (1e-3 * (b / 512) ** 0.5))) ** 2,
                         run_id=i)
             for i, (b, lr) in enumerate((b, lr) for b in (512, 2048) for lr in (3e-4, 1e-3, 3e-3, 6e-3))]
    plain = EvidenceModel.from_runs(sweep)
    assert plain.fit is not None
    poisoned = EvidenceModel.from_runs([*sweep, RunEvidence(batch_size=1024, lr=1e-3, outcome="completed",
                                                            metric=1e155, run_id=99)])
    # Scaled, the huge value is just the worst run: the fit survives or is dropped, never raises.
    if poisoned.fit is not None:
        assert math.isfinite(poisoned.fit.optimum(8192))
    recipe = recommend(REQUEST, evidence=poisoned)
    assert all(math.isfinite(s.peak_lr) and 0 < s.peak_lr <= MAX_LR for s in recipe.stages)
