"""A batch ramp's LR schedule is one schedule over the run's examples, carried piecewise by its stages:
warmup over the first W examples, then the recipe's decay over the rest of the run, each stage's LR
end + (its peak at its batch - end) x that shape, read through schedule.lr_curve (the only schedule)."""

import math

import numpy as np
import pytest

from largebatch.scaling_rules import recommend
from largebatch.scaling_rules.schedule import lr_at, lr_curve

REF = {"batch_size": 256, "seq_len": 512, "lr": 2e-4, "optimizer": "adamw", "steps": 100_000,
       "warmup_ratio": 0.02}
# The lower bound drives the ramp 64 -> 2048; B_noise itself far above: sqrt x per doubling.
TRAJ = [{"examples_seen": x, "noise_scale": 1e7, "noise_scale_low": low}
        for x, low in [(0.0, 100.0), (4e6, 400.0), (1.2e7, 1000.0), (2.56e7, 3000.0)]]
# The bound shoots up at the very end: the last stages are a few steps each.
LATE = [{"examples_seen": x, "noise_scale": 1e7, "noise_scale_low": low}
        for x, low in [(0.0, 100.0), (2.5e7, 1000.0), (2.5599e7, 2000.0), (2.56e7, 1e5)]]


def _ramp(traj=TRAJ, ref=None, **extra):
    return recommend({"model": {"params": 10**8, "family": "other"},
                      "reference": {**REF, **(ref or {}), "noise_trajectory": traj},
                      "target": {"batch_size": "ramp", "max_overhead": 1.0, "min_batch_size": 64}, **extra})


def _along(r):
    """Per step: the examples after it, the run's examples, and the stage's uncapped peak at its batch."""
    after, peak = [], []
    done = 0.0
    for s in r.stages:
        assert s.lr_cap is None or s.lr_cap >= s.ideal_lr  # no cap: the stage's peak is the rule's LR
        after.append(done + s.batch_size * np.arange(1, s.steps + 1))
        peak.append(np.full(s.steps, s.ideal_lr))
        done += s.steps * s.batch_size
    return np.concatenate(after), done, np.concatenate(peak)


def _run_shape(r, kind):
    """g(e) after each step: warmup to 1 over stage 1's warmup examples, then the decay shape to 0."""
    e, run, peak = _along(r)
    w = r.stages[0].warmup_steps * r.stages[0].batch_size
    u = np.clip((run - e) / (run - w), 0.0, 1.0)
    g = {"linear": u, "cosine": 0.5 * (1 - np.cos(np.pi * u))}[kind]
    return np.where(e <= w, e / w, g), peak, e, run


def test_the_lr_along_a_linear_ramp_is_the_run_level_schedule_exactly():
    r = _ramp()
    g, peak, _, _ = _run_shape(r, "linear")
    np.testing.assert_allclose(lr_curve(r), peak * g, rtol=1e-9, atol=1e-16)
    assert [lr_at(r, i) for i in (0, 5000, r.total_steps - 1)] == pytest.approx(lr_curve(r)[[0, 5000, -1]])


def test_a_cosine_ramp_follows_the_run_level_cosine_within_its_straight_segments():
    r = _ramp(decay="cosine")
    g, peak, _, run = _run_shape(r, "cosine")
    got, want = lr_curve(r), peak * g
    w = r.stages[0].warmup_steps * r.stages[0].batch_size
    # Each stage's segment is exact at its end and off by at most the straight line's error, max|g''| h^2 / 8.
    starts = np.cumsum([0] + [s.steps for s in r.stages])
    for i, s in enumerate(r.stages):
        sl = slice(starts[i], starts[i + 1])
        h = s.steps * s.batch_size / (run - w)
        assert np.all(np.abs(got[sl] - want[sl]) <= s.ideal_lr * (math.pi**2 / 2 * h**2 / 8 + 1e-9))
        assert got[starts[i + 1] - 1] == pytest.approx(want[starts[i + 1] - 1], rel=1e-9, abs=1e-16)
        if s.decay_steps and s.decay != "cosine":
            assert any(f"stage {i + 1}:" in x and "cosine decay" in x and "straight segment" in x for x in r.rationale)


def test_a_step_decay_drops_at_the_run_milestones_in_every_stage():
    r = _ramp(decay="step")
    e, run, peak = _along(r)
    w = r.stages[0].warmup_steps * r.stages[0].batch_size
    drops = sum((e > m * run).astype(int) for m in (30 / 90, 60 / 90, 80 / 90))
    want = np.where(e <= w, peak * e / w, peak * 0.1**drops)
    np.testing.assert_allclose(lr_curve(r), want, rtol=1e-9, atol=1e-16)
    assert drops[-1] == 3 and sum(bool(s.decay_milestones) for s in r.stages) >= 2


def test_the_decay_starts_where_a_fixed_batch_starts_it_over_the_same_examples():
    r = _ramp(plateau_ratio=0.5)
    fixed = recommend({"model": {"params": 10**8, "family": "other"}, "reference": REF,
                       "target": {"batch_size": 256}, "plateau_ratio": 0.5})
    f = fixed.stages[0]
    assert (f.warmup_steps + f.const_steps) / f.steps == pytest.approx(0.5, abs=1e-4)
    run = sum(s.steps * s.batch_size for s in r.stages)
    done = 0
    for s in r.stages:
        if s.decay_steps:
            start = done + (s.warmup_steps + s.const_steps) * s.batch_size
            assert abs(start - 0.5 * run) <= s.batch_size / 2  # rounded to that stage's step
            break
        done += s.steps * s.batch_size
    assert any("holds until 0.5 of the run" in x for x in r.rationale)
    # Without a plateau the decay starts at the end of the warmup, as for a fixed batch.
    plain = _ramp(ref={"warmup_ratio": 0.002})
    assert plain.stages[0].decay_steps == plain.stages[0].steps - plain.stages[0].warmup_steps > 0


def test_a_short_last_stage_carries_only_its_share_of_the_decay():
    r = _ramp(LATE)
    assert r.stages[-1].steps < 20 and len(r.stages) >= 4
    run = sum(s.steps * s.batch_size for s in r.stages)
    w = r.stages[0].warmup_steps * r.stages[0].batch_size
    curve = lr_curve(r)
    start = 0
    for s in r.stages:
        seg = curve[start + s.warmup_steps:start + s.steps]
        slope = s.ideal_lr / (run - w)  # the run's linear decay, per example, at this stage's peak
        if s.decay_steps:
            assert seg.max() - seg.min() <= slope * s.steps * s.batch_size * (1 + 1e-9)
        start += s.steps
    last = r.stages[-1]
    # No cliff: the last stage starts within its own share of the decay from 0.
    assert curve[-last.steps] <= last.ideal_lr * last.steps * last.batch_size / (run - w) * (1 + 1e-9)


def test_the_warmup_is_the_run_level_one_unless_the_batch_doubles_first():
    def fixed64(ratio):
        return recommend({"model": {"params": 10**8, "family": "other"}, "reference": {**REF, "warmup_ratio": ratio},
                          "target": {"batch_size": 64}}).stages[0]
    short = _ramp(ref={"warmup_ratio": 0.002})
    assert short.stages[0].warmup_steps == fixed64(0.002).warmup_steps == 800 < short.stages[0].steps
    assert not any("doubles before that warmup ends" in x for x in short.rationale)
    long = _ramp()  # 8000 warmup steps at batch 64, more than the first stage's
    s0 = long.stages[0]
    assert fixed64(0.02).warmup_steps == 8000 > s0.steps == s0.warmup_steps
    assert any("doubles before that warmup ends" in x and "warmup ends with stage 1" in x for x in long.rationale)
    assert all(s.warmup_steps == 0 for s in long.stages[1:])
