"""The evidence's curve bends where the LR stops growing with the batch: at a measured critical batch;
a bend the runs show alone (an F-test) is reported beside the power law the recipe keeps.

Truth here is the engine's own regime curve, lr*(B) = LR0 sqrt((1 + N/B0) / (1 + N/B)) with N = 2048,
and the same noisy U-shaped outcomes as the power-law landscape of ``test_learning_simulation``.
"""

import math
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from largebatch.scaling_rules import recommend
from largebatch.scaling_rules._curve import profile_sse
from largebatch.scaling_rules.learning import EvidenceModel, explore_lrs
from tests.scaling_rules import test_learning_simulation as sim

N = 2048.0
TARGET = 16384


class Bent(sim.Landscape):
    def optimum(self, batch: int) -> float:
        return sim.LR0 * math.sqrt((1 + N / sim.B0) / (1 + N / batch))

    def cliff(self, batch: int) -> float:
        return 4 * self.optimum(batch)


def request(batch: int, noise: float | None = None) -> dict:
    req = sim.request(batch)
    if noise is not None:
        req["reference"]["noise_scale"] = noise
    return req


def study(land: sim.Landscape, batches, noise: float | None = None) -> list:
    """The service's loop: recommend at each batch, sweep three LRs around it, log them."""
    runs: list = []
    for batch in batches:
        lr = recommend(request(batch, noise), evidence=runs).stages[0].peak_lr
        for x in explore_lrs(lr, 3, spread=1.8):
            runs.append(land.run(batch, x, run_id=len(runs) + 1))
    return runs


def error(land: sim.Landscape, lr: float, batch: int = TARGET) -> float:
    return lr / land.optimum(batch) - 1


@pytest.mark.slow  # statistical: ten seeded studies
def test_runs_that_show_the_bend_are_told_where_it_lies():
    """Without a measured critical batch the recipe keeps the power law; the bend the runs show (F-test)
    is fitted and reported, and on the bending landscape it is the better extrapolation."""
    bent_errors, lines, shown_in = [], [], 0
    for seed in range(10):
        land = Bent(seed)
        model = EvidenceModel.from_runs(study(land, (512, 1024, 2048, 4096)))
        recipe = recommend(request(TARGET), evidence=model)
        lines.append(error(land, recipe.stages[0].peak_lr))
        assert recipe.stages[0].peak_lr == pytest.approx(model.fit.optimum(TARGET), rel=1e-9)
        shown = model.shown_bend()
        if shown is not None:
            shown_in += 1
            bent_errors.append(error(land, shown.optimum(TARGET)))
            assert any(w.startswith("evidence: the runs' best LRs rise more slowly") and
                       f"the curve would give {shown.optimum(TARGET):.6g} at {TARGET}" in w
                       for w in recipe.warnings), recipe.warnings
    rule = error(Bent(0), recommend(request(TARGET)).stages[0].peak_lr)
    assert rule > 1.5  # sqrt from the reference: 2.8x the optimum at 16K
    # One power law through optima that already bend cannot flatten past them; the shown bend can, within
    # the 10% the power-law landscape's test asks at a batch never run.
    assert shown_in >= 7
    assert statistics.median(abs(e) for e in bent_errors) < 0.10, bent_errors
    assert statistics.median(abs(e) for e in bent_errors) < statistics.median(abs(e) for e in lines), lines


@pytest.mark.slow
def test_a_measured_critical_batch_bends_two_batch_sizes_of_evidence():
    """Runs at 512 and 1024 cannot show a bend; the study's measured critical batch places it, as the
    rule's own regime curve does, and the answer 16x past the runs stays near the truth."""
    errors = []
    for seed in range(10):
        land = Bent(seed)
        runs = study(land, (512, 1024), noise=N)
        model = EvidenceModel.from_runs(runs)
        bent = recommend(request(TARGET, N), evidence=model).stages[0].peak_lr
        line = model.fit.optimum(TARGET)  # the same runs read as a power law (no critical batch known)
        assert model.fit.bend is None
        # paired, seed by seed: the bent answer is the closer one, and the line errs upward (it overshoots)
        assert abs(error(land, bent)) < abs(error(land, line)), (seed, error(land, bent), error(land, line))
        assert error(land, line) > 0
        errors.append(error(land, bent))
    assert statistics.median(abs(e) for e in errors) < 0.10, errors  # the 10% bar of the power-law test


def test_a_power_law_study_keeps_its_line():
    """The power-law landscape (exponent 0.3): no bend passes the test, so the fit is the power law."""
    for seed in range(3):
        _, runs, _ = sim.simulate(seed, rounds=4)
        model = EvidenceModel.from_runs(runs)
        fit = model.fit
        assert fit.bend is None and fit.bend_weight == 0.0 and len(fit.components) == 1
        assert fit.optimum(8192) == pytest.approx(math.exp(fit.log_c + fit.exponent * math.log(8192)))
        assert model.shown_bend() is None
        assert not any("rise more slowly" in w for w in recommend(sim.request(8192), evidence=model).warnings)


def test_two_batch_sizes_alone_never_fit_a_bend():
    runs = study(Bent(0), (512, 2048))
    model = EvidenceModel.from_runs(runs)
    assert model.fit is not None and model.fit.bend is None and model.fit.measured_bend is None
    assert model.shown_bend() is None


def test_the_bend_follows_the_plans_critical_batch_and_says_so():
    runs = study(Bent(1), (512, 1024), noise=N)
    model = EvidenceModel.from_runs(runs)
    assert model.fit_for(None) is model.fit
    bent = model.fit_for(N)
    assert bent is model.fit_for(N)  # fitted once per critical batch, as the service reuses a model
    assert bent.measured_bend == N and bent.bend_weight == 1.0
    assert bent.optimum(TARGET) < model.fit.optimum(TARGET)
    # Near the runs the two readings agree; the bend matters where the curve flattens.
    assert bent.optimum(768) == pytest.approx(model.fit.optimum(768), rel=0.1)
    recipe = recommend(request(TARGET, N), evidence=model)
    line = next(r for r in recipe.rationale if r.startswith("evidence ("))
    assert "bent flat at the critical batch: B_noise 2048 as measured" in line
    assert f"one power law through the same runs gives {model.fit.optimum(TARGET):.4g}" in line
    assert "bent flat" not in next(r for r in recommend(request(TARGET), evidence=model).rationale
                                   if r.startswith("evidence ("))


def test_a_cached_model_keeps_a_bounded_number_of_bent_fits():
    """The service reuses one model for every request of a study, and each request may name its own
    noise_scale: the fits kept stay few, the newest kept."""
    from largebatch.scaling_rules import learning

    model = EvidenceModel.from_runs(study(Bent(2), (512, 1024), noise=N))
    fits = [model.fit_for(N * (1 + i / 100)) for i in range(3 * learning.MAX_BEND_FITS)]
    kept = [k for k in model._memo if k[0] == "bend"]
    assert len(kept) == learning.MAX_BEND_FITS
    assert model.fit_for(N * (1 + (3 * learning.MAX_BEND_FITS - 1) / 100)) is fits[-1]


@settings(max_examples=60, deadline=None)
@given(st.integers(6, 60), st.integers(1, 4), st.integers(0, 2**32 - 1), st.booleans())
def test_the_closed_form_profile_is_the_least_squares_residual(n, levels, seed, extra):
    """For any runs, each exponent's profile SSE is the residual of the least-squares fit it stands for
    (the levels and, if any, another column; then x = ln_v - g ln_b and x^2)."""
    rng = np.random.default_rng(seed)
    fixed = np.eye(levels)[rng.integers(0, levels, n)]
    if extra:
        fixed = np.column_stack([fixed, rng.normal(size=n)])
    y, ln_v = rng.normal(size=n), rng.normal(size=n) * 2
    ln_b = np.log(rng.choice([256.0, 512.0, 1024.0, 4096.0], n))
    grid = np.linspace(-0.25, 1.25, 13)
    sse = profile_sse(fixed, y, ln_v, ln_b, grid)
    for g, got in zip(grid, sse, strict=True):
        x = ln_v - g * ln_b
        design = np.column_stack([fixed, x, x * x])
        resid = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
        assert got == pytest.approx(float(resid @ resid), rel=1e-6, abs=1e-9 * float(y @ y))
