"""Evidence from a study that changed optimizer: LRs are fitted only within one optimizer's LR units,
and where another optimizer's sweep beat this one's, the recipe says so (and keeps its optimizer)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from largebatch.scaling_rules import recommend
from largebatch.scaling_rules.learning import EvidenceModel, RunEvidence

REQUEST = {
    "model": {"params": 110_000_000, "family": "transformer"},
    "reference": {"batch_size": 256, "lr": 1e-4, "optimizer": "adamw", "steps": 10_000, "warmup_ratio": 0.01},
    "target": {"batch_size": 1024},
}


def sweep(optimizer: str, best_at_256: float, floor: float, start_id: int) -> list[RunEvidence]:
    """Three LRs at batches 256 and 512 around an optimum that moves by sqrt(batch)."""
    runs = []
    for b in (256, 512):
        best = best_at_256 * math.sqrt(b / 256)
        for factor in (0.5, 1.0, 2.0):
            lr = best * factor * 1.1  # (off the optimum: the fit has to find it)
            runs.append(RunEvidence(batch_size=b, lr=lr, outcome="completed", optimizer=optimizer,
                                    metric=floor + math.log(lr / best) ** 2, warmup_ratio=0.01,
                                    run_id=start_id + len(runs)))
    return runs


ADAMW = sweep("adamw", 1e-4, 1.0, 0)
LAMB = sweep("lamb", 4e-3, 0.9, 100)  # LAMB's LRs are ~40x AdamW's here, and its runs end lower


def test_mixed_units_fit_as_their_own_optimizer_alone():
    """LAMB runs in an AdamW study leave the AdamW recipe as the AdamW runs alone make it (a single
    curve through both read the unit change as an LR effect: 8x the LR, before this was fixed)."""
    alone = recommend(REQUEST, evidence=ADAMW)
    mixed = recommend(REQUEST, evidence=ADAMW + LAMB)
    assert mixed.optimizer.name == "adamw"
    assert mixed.stages[0].peak_lr == pytest.approx(alone.stages[0].peak_lr, rel=1e-12)
    assert mixed.stages[0].warmup_steps == alone.stages[0].warmup_steps
    # and the LAMB runs alone fit LAMB's LRs, whatever AdamW runs sit beside them
    lamb_req = {**REQUEST, "reference": {**REQUEST["reference"], "optimizer": "lamb", "lr": 4e-3}}
    assert recommend(lamb_req, evidence=LAMB + ADAMW).stages[0].peak_lr == pytest.approx(
        recommend(lamb_req, evidence=LAMB).stages[0].peak_lr, rel=1e-12)


def test_a_better_optimizer_in_the_evidence_is_named_not_switched_to():
    mixed = recommend(REQUEST, evidence=ADAMW + LAMB)
    lines = [w for w in mixed.warnings if w.startswith("evidence: at batch")]
    assert len(lines) == 1
    assert "batch 512" in lines[0] and "best lamb run" in lines[0] and '"optimizer": "lamb"' in lines[0]
    # the other way round nothing is better elsewhere; nor where the user fixed the optimizer
    lamb_req = {**REQUEST, "reference": {**REQUEST["reference"], "optimizer": "lamb", "lr": 4e-3}}
    assert not [w for w in recommend(lamb_req, evidence=LAMB + ADAMW).warnings if w.startswith("evidence: at")]
    fixed = {**REQUEST, "optimizer": "adamw"}
    assert not [w for w in recommend(fixed, evidence=ADAMW + LAMB).warnings if w.startswith("evidence: at")]


def test_one_shot_of_another_optimizer_is_no_evidence_against_a_sweep():
    """A best of one run is not a best: the comparison needs two LRs or more on each side."""
    one = [r for r in LAMB if r.batch_size == 512][:1]
    assert EvidenceModel.from_runs(ADAMW + one).better_elsewhere("adamw", "adamw") == []
    assert len(EvidenceModel.from_runs(ADAMW + LAMB).better_elsewhere("adamw", "adamw")) == 1


def test_unnamed_runs_count_as_the_reference_and_lans_shares_lambs_units():
    unnamed = [r.model_copy(update={"optimizer": None}) for r in LAMB]
    model = EvidenceModel.from_runs(unnamed + ADAMW)
    assert [r.run_id for r in model.in_units_of("lamb", "lamb").runs] == [r.run_id for r in
                                                                        EvidenceModel.from_runs(LAMB).runs]
    assert model.in_units_of("lans", "lamb").runs == model.in_units_of("lamb", "lamb").runs
    assert model.in_units_of("lamb", "lamb") is model.in_units_of("lamb", "lamb")  # fitted once
    alone = EvidenceModel.from_runs(ADAMW)
    assert alone.in_units_of("adamw", "adamw") is alone  # nothing to leave out: the same model


def test_another_optimizers_divergence_does_not_cap_this_ones_lr():
    """The per-batch summaries keep one smallest diverged LR over the whole study; an AdamW run diverging
    at 1e-3 is no boundary for LAMB, whose LRs here are ~4x that."""
    from largebatch.scaling_rules.evidence import BatchSummary

    lamb_req = {**REQUEST, "reference": {**REQUEST["reference"], "optimizer": "lamb", "lr": 4e-3}}
    blown = RunEvidence(batch_size=512, lr=1e-3, outcome="diverged", optimizer="adamw", run_id=999)
    history = [BatchSummary(batch_size=512, n_runs=10, n_completed=9, n_diverged=1, min_diverged_lr=1e-3)]
    clean = recommend(lamb_req, evidence=LAMB)
    mixed = recommend(lamb_req, evidence=LAMB + ADAMW + [blown], history=history)
    assert clean.stages[0].peak_lr > 1e-3
    assert mixed.stages[0].peak_lr == pytest.approx(clean.stages[0].peak_lr, rel=1e-12)
    assert any("other LR units" in line for line in mixed.rationale)
    # one optimizer's study: its summaries still cap, as before
    alone = recommend(lamb_req, evidence=LAMB, history=[BatchSummary(batch_size=512, min_diverged_lr=2e-3)])
    assert alone.stages[0].peak_lr <= 0.8 * 2e-3


def test_the_study_history_caps_in_the_recipes_lr_units_only():
    """Summaries kept per LR units: an AdamW row's divergence at 1e-3 is no bound on a LAMB recipe, a LAMB
    row's is, also where that divergence is older than every run the evidence holds (the service reads the
    newest 2,000) and AdamW runs sit beside LAMB's; the rationale names the units that capped."""
    from largebatch.scaling_rules import priors
    from largebatch.scaling_rules.evidence import BatchSummary
    from largebatch.scaling_rules.optimizers import UNNAMED_UNITS, units_of

    lamb_req = {**REQUEST, "reference": {**REQUEST["reference"], "optimizer": "lamb", "lr": 4e-3}}
    adamw = BatchSummary(batch_size=512, n_runs=4, n_completed=3, n_diverged=1, min_diverged_lr=1e-3,
                         units=units_of("adamw"))
    old = BatchSummary(batch_size=256, n_runs=5, n_completed=4, n_diverged=1, min_diverged_lr=5e-3,
                       units=units_of("lamb"))
    assert not [r for r in LAMB + ADAMW if r.outcome == "diverged"]  # the cap below is the summaries' alone
    clean = recommend(lamb_req, evidence=LAMB).stages[0].peak_lr
    assert clean > 5e-3
    mixed = recommend(lamb_req, evidence=LAMB + ADAMW, history=[adamw])
    assert mixed.stages[0].peak_lr == pytest.approx(clean, rel=1e-12)
    assert any("divergences in other LR units (adam) do not cap lamb's LR" in line for line in mixed.rationale)
    for evidence in (LAMB + ADAMW, LAMB, ()):
        capped = recommend(lamb_req, evidence=evidence, history=[adamw, old])
        assert capped.stages[0].peak_lr == pytest.approx(priors.DIVERGENCE_MARGIN * 5e-3, rel=1e-12)
        assert any("study history in lamb's LR units (layerwise-adam): LR 0.005 diverged at batch 256" in line
                   for line in capped.rationale), capped.rationale
    # The row of runs that named no optimizer is in the reference's units: LAMB's here, AdamW's for a LAMB
    # recipe from an AdamW reference.
    unnamed = old.model_copy(update={"units": UNNAMED_UNITS})
    assert recommend(lamb_req, evidence=LAMB + ADAMW, history=[unnamed]).stages[0].peak_lr == pytest.approx(
        priors.DIVERGENCE_MARGIN * 5e-3, rel=1e-12)
    fixed = {**REQUEST, "optimizer": "lamb"}
    low = unnamed.model_copy(update={"min_diverged_lr": 1e-4})
    assert recommend(fixed, history=[low]).stages[0].peak_lr == recommend(fixed).stages[0].peak_lr > 1e-4
    assert recommend(fixed, history=[old.model_copy(update={"min_diverged_lr": 1e-4})]).stages[0].peak_lr == \
        pytest.approx(priors.DIVERGENCE_MARGIN * 1e-4, rel=1e-12)


def _runs(optimizer: str, scale: float, start_id: int):
    return st.lists(st.builds(
        RunEvidence,
        batch_size=st.sampled_from([256, 512, 1024, 4096]),
        lr=st.sampled_from([0.5, 0.7, 1.0, 1.4, 2.0, 2.8]).map(lambda f: f * scale),
        outcome=st.sampled_from(["completed", "completed", "completed", "diverged"]),
        metric=st.floats(0.5, 3.0),
        warmup_ratio=st.sampled_from([0.005, 0.01, 0.02]),
        optimizer=st.just(optimizer),
        run_id=st.integers(start_id, start_id + 999),
    ), max_size=14)


@settings(max_examples=80, deadline=None)
@given(_runs("adamw", 1e-4, 0), _runs("lamb", 4e-3, 1000), st.sampled_from(["adamw", "lamb"]))
def test_any_other_optimizers_runs_leave_the_recipe_as_its_own_runs_make_it(adamw, lamb, reference):
    """Whatever runs of the other LR units a study holds, the recipe is the one its own optimizer's runs
    give alone (no runs of its own: the one no evidence gives)."""
    req = {**REQUEST, "reference": {**REQUEST["reference"], "optimizer": reference,
                                    "lr": 1e-4 if reference == "adamw" else 4e-3}}
    own, other = (adamw, lamb) if reference == "adamw" else (lamb, adamw)
    mixed = recommend(req, evidence=own + other)
    alone = recommend(req, evidence=own)
    assert mixed.optimizer.name == alone.optimizer.name
    assert [s.model_dump() for s in mixed.stages] == [s.model_dump() for s in alone.stages]
