"""Every bad input is an error that names the field; nothing half-computed comes back."""

import copy
import math

import pytest
from pydantic import ValidationError

from largebatch.scaling_rules import RecipeError, recommend

GOOD = {"model": {"params": 340_000_000}, "target": {"batch_size": 32768},
        "reference": {"batch_size": 512, "lr": 6.25e-4, "optimizer": "lamb", "warmup_ratio": 1 / 320,
                      "steps": 1_000_000}}


def _with(path: str, value):
    req = copy.deepcopy(GOOD)
    *parents, leaf = path.split(".")
    node = req
    for p in parents:
        node = node[p]
    node[leaf] = value
    return req


@pytest.mark.parametrize(("path", "value", "field"), [
    ("target.batch_size", 0, "target.batch_size"),
    ("target.batch_size", -512, "target.batch_size"),
    ("target.batch_size", 32768.5, "target.batch_size"),
    ("target.batch_size", "32K", "target.batch_size"),
    ("reference.batch_size", 0, "reference.batch_size"),
    ("reference.lr", 0.0, "reference.lr"),
    ("reference.lr", -1e-3, "reference.lr"),
    ("reference.lr", math.nan, "reference.lr"),
    ("reference.lr", math.inf, "reference.lr"),
    ("reference.steps", 0, "reference.steps"),
    ("reference.warmup_ratio", 1.5, "reference.warmup_ratio"),
    ("reference.optimizer", "adagrad", "reference.optimizer"),
    ("optimizer", "adagrad", "optimizer"),
    ("rule", "cubic", "rule"),
    ("lr_cap", math.nan, "lr_cap"),
    ("lr_cap", 0, "lr_cap"),
    ("model.params", 0, "model.params"),
    ("model.family", "rnn", "model.family"),
    ("target.batchsize", 5, "target.batchsize"),
    ("target.tokens", -1.0, "target.tokens"),
    ("target.compute", math.inf, "target.compute"),
    ("model.width", 0, "model.width"),
    ("reference.model_width", 1.5, "reference.model_width"),
    ("weight_decay_rule", "adaptive", "weight_decay_rule"),
    ("decay", "exponential", "decay"),
])
def test_bad_field_is_named(path, value, field):
    with pytest.raises(ValidationError) as exc:
        recommend(_with(path, value))
    locs = {".".join(str(x) for x in e["loc"]) for e in exc.value.errors()}
    assert field in locs, locs


def test_stage_shares_must_sum_to_one():
    req = {"model": GOOD["model"], "reference": GOOD["reference"],
           "stages": [{"batch_size": 65536, "share": 0.9}, {"batch_size": 32768, "share": 0.2}]}
    with pytest.raises(ValidationError, match="shares must sum to 1"):
        recommend(req)


def test_stage_shares_all_or_none():
    req = {"model": GOOD["model"], "reference": GOOD["reference"],
           "stages": [{"batch_size": 65536, "share": 0.9}, {"batch_size": 32768}]}
    with pytest.raises(ValidationError, match="share for every stage"):
        recommend(req)


def test_stage_without_any_reference():
    with pytest.raises(ValidationError, match=r"stages\[0\]\.reference is required"):
        recommend({"model": GOOD["model"], "stages": [{"batch_size": 65536}]})


def test_plateau_below_warmup_is_refused():
    req = {"model": GOOD["model"], "stages": [{"batch_size": 98304, "plateau_ratio": 0.1, "reference":
           {"batch_size": 65536, "lr": 6e-3, "warmup_ratio": 0.2843, "steps": 7038}}]}
    with pytest.raises(RecipeError, match=r"stages\[0\]\.plateau_ratio"):
        recommend(req)


def test_missing_reference_and_target():
    with pytest.raises(ValidationError, match="reference is required"):
        recommend({"model": GOOD["model"], "target": GOOD["target"]})
    with pytest.raises(ValidationError, match="target is required"):
        recommend({"model": GOOD["model"], "reference": GOOD["reference"]})


def test_warmup_ratio_and_steps_are_exclusive():
    with pytest.raises(ValidationError, match="not both"):
        recommend(_with("reference.warmup_steps", 3125))


def test_auto_batch_needs_a_noise_scale_or_a_budget():
    with pytest.raises(RecipeError, match=r"target.tokens or target.compute"):
        recommend(_with("target.batch_size", "auto"))
    req = _with("target.batch_size", "auto")
    req["target"]["compute"] = 1e21
    with pytest.raises(RecipeError, match="seq_len"):  # the laws give tokens
        recommend(req)
