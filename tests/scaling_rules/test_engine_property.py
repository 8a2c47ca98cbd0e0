"""Any request inside the documented limits gives a finite, trainable recipe or a named error:
never another exception (issue #13: one stored or posted number must not break the engine)."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from largebatch.scaling_rules import RecipeError, recommend
from largebatch.scaling_rules.models import MAX_COUNT, MAX_LR, MAX_PARAMS, MIN_LR

counts = st.one_of(st.integers(1, 64), st.integers(1, MAX_COUNT))
lrs = st.floats(MIN_LR, MAX_LR)
optimizers = st.sampled_from(["lamb", "lans", "adamw", "adam", "lars", "sgd"])


@st.composite
def requests(draw):
    ref = {"lr": draw(lrs), "optimizer": draw(optimizers)}
    if draw(st.booleans()):
        ref["batch_size"] = draw(counts)
    else:
        ref["batch_tokens"] = draw(counts)
        ref["seq_len"] = draw(st.sampled_from([1, 128, 2048]))
    if draw(st.booleans()):
        ref["steps"] = draw(counts)
    if draw(st.booleans()):
        ref["warmup_ratio"] = draw(st.floats(0, 0.99))
    for key, strat in (("model_params", st.integers(1, MAX_PARAMS)), ("noise_scale", st.floats(1e-3, 1e12)),
                       ("betas", st.tuples(st.floats(0, 0.999), st.floats(0, 0.999))),
                       ("decay", st.sampled_from(["linear", "cosine", "polynomial", "step"]))):
        if draw(st.booleans()):
            ref[key] = draw(strat)
    target = {"batch_size": draw(st.one_of(counts, st.just("auto")))}
    if draw(st.booleans()):
        target["steps"] = draw(counts)
    req = {"model": {"params": draw(st.integers(1, MAX_PARAMS)), "family": draw(st.sampled_from(["transformer", "cnn",
                                                                                                 "other"]))},
           "reference": ref, "target": target,
           "budget": draw(st.sampled_from(["same-epochs", "same-steps", "same-loss"]))}
    for key, strat in (("lr_cap", lrs), ("optimizer", optimizers.filter(lambda o: o != "adam")),
                       ("adam_hparams", st.just("sde")), ("end_lr", st.floats(0, 1))):
        if draw(st.booleans()):
            req[key] = draw(strat)
    return req


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_any_request_gives_a_finite_recipe_or_a_named_error(req):
    try:
        recipe = recommend(req)
    except (ValidationError, RecipeError):
        return
    for s in recipe.stages:
        assert s.steps >= 1 and s.warmup_steps + s.const_steps + s.decay_steps == s.steps
        assert min(s.warmup_steps, s.const_steps, s.decay_steps) >= 0
        assert math.isfinite(s.peak_lr) and s.peak_lr > 0
        for v in (s.ideal_lr, s.lr_cap, s.examples_ratio, s.steps_ratio):
            assert v is None or math.isfinite(v)


@pytest.mark.parametrize("bad", [
    {"reference": {"batch_size": 512, "lr": 1e306, "steps": 10}},
    {"reference": {"batch_size": 512, "lr": 1e-3, "steps": 2**70}},
    {"reference": {"batch_size": 512, "lr": 1e-3, "steps": 10, "warmup_steps": 2**70}},
    {"reference": {"batch_size": True, "lr": 1e-3, "steps": 10}},
    {"reference": {"batch_size": "512", "lr": 1e-3, "steps": 10}},
    {"reference": {"batch_size": 512, "lr": "1e-3", "steps": 10}},
    {"lr_cap": 5e-324},
    {"stages": [{"batch_size": 1024}] * 65},
])
def test_out_of_range_numbers_are_named(bad):
    req = {"model": {"params": 10**8}, "reference": {"batch_size": 512, "lr": 1e-3, "steps": 10},
           "target": {"batch_size": 1024}, **bad}
    if "stages" in bad:
        req.pop("target")
    with pytest.raises(ValidationError):
        recommend(req)
