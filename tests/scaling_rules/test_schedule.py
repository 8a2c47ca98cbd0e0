import numpy as np
import pytest

from largebatch.scaling_rules import lr_at, lr_curve, recommend, schedule_area
from largebatch.scaling_rules.schedule import stage_boundaries

from .test_paper_vectors import LAMB_REF, LANS_REQUEST


def test_eq8_shape_at_32k():
    recipe = recommend({"model": {"params": 340_000_000}, "reference": LAMB_REF, "target": {"batch_size": 32768}})
    assert lr_at(recipe, 0) == pytest.approx(0.005 / 3125)  # t = 1: eta * 1 / T_w
    assert lr_at(recipe, 3124) == pytest.approx(0.005)  # t = T_w: the peak
    assert lr_at(recipe, 15624) == 0.0  # t = T: eta * (T - T) / ...
    assert lr_at(recipe, 3124 + 6250) == pytest.approx(0.005 * (15625 - 9375) / 12500)
    assert lr_at(recipe, 10**9) == 0.0  # past the end: the end LR


def test_eq9_constant_phase_and_stages_rewarm():
    recipe = recommend(LANS_REQUEST)
    _s1, s2 = recipe.stages
    assert lr_at(recipe, 1499) == pytest.approx(0.00675)
    assert lr_at(recipe, 1500) == lr_at(recipe, 1500 + 962) == 0.00675  # the constant phase
    assert lr_at(recipe, 1500 + 963) < 0.00675  # the decay
    start2 = stage_boundaries(recipe)[1]
    assert start2 == 3519
    assert lr_at(recipe, start2) == pytest.approx(0.005 / s2.warmup_steps)  # re-warms from zero


def test_vectorised_equals_scalar_everywhere():
    recipe = recommend(LANS_REQUEST)
    curve = lr_curve(recipe)
    assert curve.shape == (recipe.total_steps,)
    scalar = np.array([lr_at(recipe, i) for i in range(recipe.total_steps)])
    np.testing.assert_array_equal(curve, scalar)


def test_cosine_decay_and_end_lr():
    req = {"model": {"params": 110_000_000}, "reference": LAMB_REF, "target": {"batch_size": 8192},
           "decay": "cosine", "end_lr": 1e-5}
    recipe = recommend(req)
    s = recipe.stages[0]
    steps = np.arange(recipe.total_steps + 5)
    np.testing.assert_allclose(lr_curve(recipe, steps), [lr_at(recipe, int(i)) for i in steps], rtol=0, atol=0)
    assert lr_at(recipe, recipe.total_steps - 1) == pytest.approx(1e-5)
    mid = s.warmup_steps + s.decay_steps // 2
    assert lr_at(recipe, mid) == pytest.approx((s.peak_lr + 1e-5) / 2, rel=1e-3)


def test_million_step_curve():
    recipe = recommend({"model": {"params": 340_000_000}, "reference": LAMB_REF, "target": {"batch_size": 512}})
    curve = lr_curve(recipe)
    assert curve.shape == (1_000_000,) and curve.max() == pytest.approx(6.25e-4)


def test_negative_step_is_refused():
    recipe = recommend(LANS_REQUEST)
    with pytest.raises(ValueError, match="step must be >= 0"):
        lr_at(recipe, -1)


def test_multistep_and_wsd_shapes():
    """DeepSeek LLM's multi-step (31.6% of the peak after 80%, 10% after 90%) and warmup-stable-decay
    (held, then a linear cooldown over the last 20%), from the engine and through the one schedule."""
    ref = {"batch_size": 512, "lr": 1e-3, "optimizer": "adamw", "warmup_steps": 100, "steps": 1000}
    base = {"model": {"params": 10**8}, "reference": ref, "target": {"batch_size": 512}}
    ms = recommend({**base, "decay": "multistep"})
    assert [lr_at(ms, t) for t in (799, 800, 899, 900, 999)] == pytest.approx(
        [1e-3, 1e-3 * 10**-0.5, 1e-3 * 10**-0.5, 1e-4, 1e-4])
    assert lr_curve(ms).sum() == pytest.approx(schedule_area(ms))
    wsd = recommend({**base, "decay": "wsd"})
    (s,) = wsd.stages
    assert (s.warmup_steps, s.const_steps, s.decay_steps) == (100, 700, 200)
    assert lr_at(wsd, 799) == 1e-3 and lr_at(wsd, 899) == pytest.approx(1e-3 * 100 / 200)
    assert lr_curve(wsd).sum() == pytest.approx(schedule_area(wsd))
