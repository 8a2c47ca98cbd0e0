"""The steps-to-target helpers of benchmarks/critical_batch.py (benchmarks/_steps_to_target.py): the
interpolated crossing, the weight average's memory, the hyperbola's fit and its bootstrap interval."""

import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _steps_to_target as stt


def test_the_crossing_is_interpolated_in_log_step():
    # loss linear in log(step): 2.0 at step 10, 1.0 at step 40, so 1.5 is crossed at step 20 exactly
    trace = [(5, 2.5), (10, 2.0), (40, 1.0), (50, 0.9)]
    assert stt.crossing(trace, 1.5) == pytest.approx(20.0)
    assert stt.crossing(trace, 2.0) == pytest.approx(10.0)  # reached exactly at an evaluation
    assert stt.crossing(trace, 0.5) is None  # never reached
    assert stt.crossing([(7, 1.0)], 1.5) == 7.0  # below at the first evaluation: no earlier point to use
    # a loss that rose after dipping is crossed where it first got there
    assert stt.crossing([(1, 3.0), (2, 1.0), (3, 2.0), (4, 0.5)], 1.5) == pytest.approx(math.exp(0.75 * math.log(2)))


def test_the_weight_average_lags_by_a_fixed_share_of_the_steps():
    """Averaging w_t = t: the lag behind the current step is the same share at 300 and at 3000 steps, so
    the averaged weights stretch every batch's steps-to-target by one factor and leave B_crit alone."""
    def lag_share(steps: int) -> float:
        avg = 0.0
        for t in range(1, steps + 1):
            avg += (t - avg) * (1 - stt.ema_decay(t))
        return 1 - avg / steps

    assert lag_share(300) == pytest.approx(lag_share(3000), rel=0.03)
    assert 0.05 < lag_share(3000) < 0.15  # about EMA_SHARE of the steps
    assert stt.ema_decay(1) < 0.1  # the first steps are not averaged with the initialisation


def test_the_hyperbola_is_recovered_from_exact_steps():
    s_min, b_crit = 40.0, 300.0
    batches = [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    steps = [s_min * (1 + b_crit / b) for b in batches]
    fit = stt.fit_hyperbola(batches, steps)
    assert fit[0] == pytest.approx(s_min) and stt.b_crit_of(*fit) == pytest.approx(b_crit)
    assert stt.fit_rms(batches, steps, *fit) < 1e-12
    # steps that still halve with every doubling: S_min <= 0, B_crit beyond the largest batch
    assert stt.b_crit_of(*stt.fit_hyperbola(batches, [1e5 / b for b in batches])) == math.inf or \
        stt.fit_hyperbola(batches, [1e5 / b for b in batches])[0] == pytest.approx(0, abs=1e-6)


def test_the_bootstrap_interval_of_b_crit_contains_the_true_one():
    s_min, b_crit = 40.0, 300.0
    batches = [8, 32, 128, 512, 2048]
    rng = random.Random(3)
    covered, widths = 0, []
    for _ in range(20):  # 8% noise per seed, 5 fresh seeds per batch, as in the benchmark
        seeds = [[s_min * (1 + b_crit / b) * math.exp(rng.gauss(0, 0.08)) for _ in range(5)] for b in batches]
        lo, hi = stt.bootstrap_b_crit(batches, seeds, resamples=400, seed=rng.randrange(1000))
        covered += lo < b_crit < hi
        widths.append(hi / lo)
    # a percentile bootstrap of 5 seeds covers somewhat less than its nominal 95%
    assert covered >= 15, covered
    assert sorted(widths)[10] < 3  # a usable interval
    exact = [[s_min * (1 + b_crit / b)] * 5 for b in batches]
    lo, hi = stt.bootstrap_b_crit(batches, exact, resamples=200)
    assert lo == pytest.approx(b_crit) and hi == pytest.approx(b_crit)
    # the ratio of two tasks' B_crit, with its interval
    twice = [[s_min * (1 + 2 * b_crit / b)] * 5 for b in batches]
    assert stt.bootstrap_b_crit_ratio((batches, twice), (batches, exact), resamples=100) == pytest.approx((2, 2))


def test_an_unbounded_b_crit_ranks_above_every_finite_one():
    batches = [8, 32, 128, 512]
    # steps falling as 1/B at every batch (S_min ~ 0) with noise: many resamples fit S_min <= 0
    rng = random.Random(0)
    seeds = [[1e5 / b * math.exp(rng.gauss(0, 0.1)) for _ in range(3)] for b in batches]
    lo, hi = stt.bootstrap_b_crit(batches, seeds, resamples=300)
    assert hi == math.inf and lo > 0


def test_the_verdict_of_an_interval_against_a_band():
    assert stt.within(1.2, 1.8, 0.5, 2) == "yes"
    assert stt.within(2.5, 4.0, 0.5, 2) == "no"
    assert stt.within(0.1, 0.4, 0.5, 2) == "no"
    assert stt.within(1.5, 2.5, 0.5, 2) == "undecided"
    assert stt.within(0.0, math.inf, 0.5, 2) == "undecided"


@pytest.mark.slow  # the first torch optimizer in a process imports torch._dynamo: seconds, for any test
def test_a_run_reaches_the_target_on_its_averaged_weights():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 4, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(2000, generator=gen)

    class Task:
        b0 = 4

        def make_model(self):
            return torch.nn.Linear(4, 1)

        def batch(self, g, size):
            idx = torch.randint(0, 1500, (size,), generator=g)
            return x[idx], y[idx]

        def loss(self, model, xb, yb):
            return ((model(xb).squeeze(-1) - yb) ** 2).mean()

        @torch.no_grad()
        def val_loss(self, model):
            return float(self.loss(model, x[1500:], y[1500:]))

    run = stt.train(Task(), 16, 0.05, 400, seed=0, target=0.5)
    assert run.steps is not None
    before = [s for s, _ in run.trace if s < run.steps]
    assert run.trace[-1][1] <= 0.5 and all(v > 0.5 for s, v in run.trace[:-1])
    assert before and before[-1] < run.steps <= run.trace[-1][0]
    # evaluations from a later step: the same run, the crossing read between the same kind of points
    late = stt.train(Task(), 16, 0.05, 400, seed=0, target=0.5, eval_from=int(run.steps / 2))
    assert late.steps == pytest.approx(run.steps, rel=0.15)
    # past the crossing already at the first evaluation: run again from step 1
    again = stt.train(Task(), 16, 0.05, 400, seed=0, target=0.5, eval_from=int(run.steps * 3))
    assert again.steps == pytest.approx(run.steps)


def test_label_noise_flips_only_training_labels():
    torch = pytest.importorskip("torch")
    from dataclasses import dataclass

    @dataclass
    class Task:
        train_y: object
        val_y: object

    y = torch.arange(10).repeat(1000)
    noisy = stt.label_noise_task(Task(y, y.clone()), 0.5)
    changed = float((noisy.train_y != y).float().mean())
    assert changed == pytest.approx(0.5 * 0.9, abs=0.02)  # a random class is the old one 1 time in 10
    assert torch.equal(noisy.val_y, y) and torch.equal(y, torch.arange(10).repeat(1000))
