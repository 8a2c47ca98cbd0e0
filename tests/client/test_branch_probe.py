"""``job.branch_probe``: branches at k x B from the job's state, then training goes on exactly as if no
probe had run (parameters, optimizer state, the next losses and every RNG, bit for bit)."""

from __future__ import annotations

import logging
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from largebatch.client import Client  # noqa: E402
from largebatch.client._probe import curve_steps, fit_critical_batch  # noqa: E402

from ._training import BATCH, IN, REFERENCE, Data, train  # noqa: E402

FAST = {"flush_interval": 0.1, "heartbeat_interval": 30.0, "close_timeout": 30.0}


@pytest.fixture
def client(service):
    with Client(service.url) as c:
        yield c


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # dropout: the branches draw from the RNG the probe must give back
    return torch.nn.Sequential(torch.nn.Linear(IN, 32), torch.nn.Tanh(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1))


def stream():
    data = Data(7)
    while True:
        yield data.batch(BATCH // 2)


def loss_fn(model, batch):
    x, y = batch
    x = x * (1 + 0.01 * random.random())  # an augmentation that draws from python's RNG
    return torch.nn.functional.mse_loss(model(x), y)


def run(client, study: str, probe: bool):
    model = make_model()
    job = client.autoconfigure(model, study=study, reference=REFERENCE, target_batch_size=BATCH, job_options=FAST)
    data = Data(1)
    result = None
    with job:
        _, losses = train(job, model, 20, data)
        if probe:
            rng = (torch.get_rng_state(), random.getstate())
            result = job.branch_probe(model, stream, loss_fn, ks=(1, 2, 4), steps=8, micro_batches=2)
            assert torch.equal(rng[0], torch.get_rng_state()) and rng[1] == random.getstate()
        _, more = train(job, model, 30, data, start=20)
        job.complete(0.0)
    state = job.optimizer.state_dict()["state"]
    return {"params": [p.detach().clone() for p in model.parameters()], "losses": losses + more,
            "opt": [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in state.values()],
            "lr": [g["lr"] for g in job.optimizer.param_groups], "sched": job.scheduler.last_epoch,
            "rng": torch.rand(3)}, result


def test_branch_probe_restores_everything_bit_for_bit(service, client, caplog):
    caplog.set_level(logging.INFO, logger="largebatch.client")
    plain, _ = run(client, "probe-none", probe=False)
    probed, result = run(client, "probe", probe=True)
    assert all(torch.equal(a, b) for a, b in zip(plain["params"], probed["params"], strict=True))
    assert plain["losses"] == probed["losses"]
    for a, b in zip(plain["opt"], probed["opt"], strict=True):
        assert a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    assert plain["lr"] == probed["lr"] and plain["sched"] == probed["sched"]
    assert torch.equal(plain["rng"], probed["rng"])
    # what it measured: the same examples per branch, the LR by LAMB's sqrt rule (no B_noise known)
    assert sorted(result.losses) == [1, 2, 4] and result.batch_size == BATCH and result.step == 19
    assert result.window_examples == 8 * BATCH and result.cost_examples == 3 * 8 * BATCH
    assert result.cost_steps == 8 + 4 + 2
    assert result.lr_factors == {1: 1.0, 2: pytest.approx(math.sqrt(2)), 4: pytest.approx(2.0)}
    # the moments keep the run's memory in examples: LAMB's (0.9, 0.999) as beta^k
    assert result.betas == {k: (pytest.approx(0.9 ** k), pytest.approx(0.999 ** k)) for k in (1, 2, 4)}
    assert result.gains[1] > 3 * result.gain_se[1] > 0  # early in training: the window's progress is resolved
    # the k = 1 branch read at each of its 8 steps, its last point the window's end
    assert sorted(result.curve) == list(range(1, 9)) and result.curve[8] == result.losses[1]
    assert set(result.examples_ratios) == {2, 4} and all(1 <= r <= k for k, r in result.examples_ratios.items())
    assert all(result.loss_before - result.losses[k] == pytest.approx(result.gains[k]) for k in result.losses)
    assert result.note
    logged = [r.getMessage() for r in caplog.records if "branch probe" in r.getMessage()]
    assert logged and "3 branches" in logged[0] and f"{3 * 8 * BATCH} training examples" in logged[0]


def run_measuring(client, study: str, probe: bool):
    """Two micro-batches per step with job.measure_noise: the probe's steps must not reach the estimator."""
    model = make_model()
    job = client.autoconfigure(model, study=study, reference=REFERENCE, target_batch_size=BATCH, job_options=FAST)
    noise = job.measure_noise(model, job.batch_plan(per_device_batch_size=BATCH // 2))
    data = Data(1)
    with job:
        for step in range(30):
            if probe and step == 15:
                job.branch_probe(model, stream, loss_fn, ks=(1, 2), steps=4, micro_batches=2)
            for _ in range(2):
                x, y = data.batch(BATCH // 2)
                (torch.nn.functional.mse_loss(model(x), y) / 2).backward()
            job.optimizer.step()
            job.scheduler.step()
            job.optimizer.zero_grad()
            job.report(step, 0.0)
        job.complete(0.0)
    return noise.state_dict(), [p.detach().clone() for p in model.parameters()]


def test_branch_probe_is_not_seen_by_the_noise_estimator(service, client):
    plain, plain_params = run_measuring(client, "probe-noise-none", probe=False)
    probed, probed_params = run_measuring(client, "probe-noise", probe=True)
    assert plain["n_updates"] == 30 and probed == plain
    assert all(torch.equal(a, b) for a, b in zip(plain_params, probed_params, strict=True))


@pytest.mark.parametrize("memory", ["examples", "steps"])
def test_each_branch_steps_with_its_betas_and_the_run_gets_its_own_back(service, client, memory):
    """What the optimizer held at every step of every branch, read as it steps, not the result's claim (the
    probe mutes the job's step hooks, so the step method itself is watched)."""
    model = make_model()
    job = client.autoconfigure(model, study=f"probe-betas-{memory}", reference=REFERENCE, target_batch_size=BATCH,
                               job_options=FAST)
    seen: list[tuple[float, tuple[float, ...]]] = []
    with job:
        train(job, model, 5, Data(1))
        run_lr, run_betas = job.optimizer.param_groups[0]["lr"], job.optimizer.param_groups[0]["betas"]
        opt, step = job.optimizer, job.optimizer.step

        def watched(*args, **kwargs):
            seen.append((opt.param_groups[0]["lr"], tuple(opt.param_groups[0]["betas"])))
            return step(*args, **kwargs)

        opt.step = watched
        try:
            result = job.branch_probe(model, stream, loss_fn, ks=(1, 4, 16), steps=16, moment_memory=memory)
        finally:
            del opt.step
        assert job.optimizer.param_groups[0]["betas"] == run_betas and job.optimizer.param_groups[0]["lr"] == run_lr
        job.fail("test over")
    power = {1: 1, 4: 4, 16: 16} if memory == "examples" else {1: 1, 4: 1, 16: 1}
    expected = [(run_lr * result.lr_factors[k], tuple(b ** power[k] for b in run_betas))
                for k in (1, 4, 16) for _ in range(16 // k)]
    assert len(seen) == len(expected) == 16 + 4 + 1
    for (lr, betas), (want_lr, want) in zip(seen, expected, strict=True):
        assert lr == pytest.approx(want_lr) and betas == pytest.approx(want)
    assert result.betas == {k: pytest.approx(tuple(b ** power[k] for b in run_betas)) for k in (1, 4, 16)}


def test_branch_probe_bad_input(service, client):
    model = make_model()
    job = client.autoconfigure(model, study="probe-bad", reference=REFERENCE, target_batch_size=BATCH,
                               job_options=FAST)
    with job:
        with pytest.raises(ValueError, match="ks"):
            job.branch_probe(model, stream, loss_fn, ks=(1,))
        with pytest.raises(ValueError, match="steps"):
            job.branch_probe(model, stream, loss_fn, ks=(1, 2), steps=7)
        with pytest.raises(ValueError, match="micro_batches"):
            job.branch_probe(model, stream, loss_fn, micro_batches=0)
        with pytest.raises(ValueError, match="moment_memory"):
            job.branch_probe(model, stream, loss_fn, moment_memory="epochs")
        with pytest.raises(ValueError, match="ran out"):
            job.branch_probe(model, lambda: [Data(7).batch(64)] * 3, loss_fn, ks=(1, 2), steps=2)
        job.fail("test over")


def _synthetic(batch: float, bc: float, ks: tuple[int, ...], steps: int, tau: float = 3000.0):
    """The smallest branch's gain along its window and each branch's final gain where reaching a loss at
    batch b takes E_min (1 + b/B_crit) examples: branch k's window counts as W (1 + B/B_crit) / (1 + kB/B_crit)
    examples at B; the loss falls in the examples as 1 - exp(-e/tau), so not linearly."""
    def gain(examples):
        return 0.5 * (1 - math.exp(-examples / tau))
    kmin = min(ks)
    window = steps * batch
    curve = [(n, gain(n * kmin * batch), 1e-5) for n in curve_steps(steps, ks)]
    gains = [gain(window * (1 + kmin * batch / bc) / (1 + k * batch / bc)) for k in ks]
    return curve, gains


def test_fit_recovers_a_known_critical_batch_at_equal_loss():
    batch, ks, steps = 100.0, (1, 2, 4, 8, 16), 64
    assert curve_steps(steps, ks) == [4, 5, 6, 7, 8, 10, 11, 13, 16, 19, 23, 27, 32, 38, 45, 54, 64]
    assert curve_steps(8, (1, 2, 4, 8)) == list(range(1, 9))
    for bc in (300.0, 1000.0):
        curve, gains = _synthetic(batch, bc, ks, steps)
        got, (lo, hi), note, ratios = fit_critical_batch(batch, ks, steps, curve, gains, [1e-5] * len(ks))
        assert got == pytest.approx(bc, rel=0.03) and lo <= got <= hi and hi / lo < 1.3 and "inside" in note
        for k in ks[1:]:
            assert ratios[k] == pytest.approx((1 + k * batch / bc) / (1 + batch / bc), rel=0.03)
    # every branch as far as the smallest at equal examples: the critical batch is beyond the branches
    flat = [(n, 0.2 * n / 64, 1e-3) for n in curve_steps(steps, ks)]
    got, interval, note, ratios = fit_critical_batch(batch, ks, steps, flat, [0.2] * len(ks), [1e-3] * len(ks))
    assert got is None and interval[1] == math.inf and "above" in note and set(ratios.values()) == {1.0}
    # no resolved progress in the window: nothing to compare
    tiny = [(n, 1e-4, 1e-3) for n in curve_steps(steps, ks)]
    got, interval, note, _ = fit_critical_batch(batch, ks, steps, tiny, [1e-4] * len(ks), [1e-3] * len(ks))
    assert got is None and interval is None and "lengthen the window" in note


@pytest.mark.slow  # two gloo processes
def test_branch_probe_under_ddp_restores_and_agrees(service, tmp_path):
    import multiprocessing as mp

    from .probe_ddp_worker import worker

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, service.url, str(tmp_path / "init"), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail("a DDP worker hung")
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for out in ranks:
        assert all(torch.equal(a, b) for a, b in zip(out["plain"]["params"], out["probed"]["params"], strict=True))
        assert out["plain"]["losses"] == out["probed"]["losses"]
    # one result for the run: the losses are read over both ranks' evaluation micro-batches
    assert ranks[0]["probed"]["result"] == ranks[1]["probed"]["result"]
    losses, gains, _ = ranks[0]["probed"]["result"]
    assert sorted(losses) == [1, 2] and gains[1] > 0


@settings(max_examples=60, deadline=None)
@given(st.floats(0.6, 4.6), st.floats(1.0 / math.log(2), 20.0))
def test_the_equal_loss_reading_recovers_any_critical_batch_inside_the_branches(log2_bc_over_b, tau_over_window):
    """Not only the two values the reading was written against: any B_crit inside the branches' span
    (B..32B) and any curvature of the loss in the examples, up to the probe's own limit (a window that
    takes more than half the loss is flagged as too long: tau >= window / ln 2)."""
    batch, ks, steps = 100.0, (1, 2, 4, 8, 16, 32), 64
    bc = batch * 2.0 ** log2_bc_over_b
    curve, gains = _synthetic(batch, bc, ks, steps, tau=tau_over_window * steps * batch)
    got, (lo, hi), _, _ = fit_critical_batch(batch, ks, steps, curve, gains, [1e-5] * len(ks))
    assert got == pytest.approx(bc, rel=0.05) and lo <= got <= hi


def _coverage(bc: float, tau: float, noise: float, rng: random.Random, draws: int) -> tuple[int, int]:
    """(draws whose 90% interval holds ``bc``, draws read) over losses drawn about a known critical batch
    with data-order noise ``noise``, independent per step and per branch, the evaluation's standard
    error tiny (as on the same held-out examples)."""
    batch, ks, steps = 100.0, (1, 2, 4, 8, 16, 32), 64
    curve, gains = _synthetic(batch, bc, ks, steps, tau=tau)
    held = n = 0
    for _ in range(draws):
        noisy = [(m, g + rng.gauss(0, noise), s) for m, g, s in curve]
        _, interval, _, _ = fit_critical_batch(batch, ks, steps, noisy, [g + rng.gauss(0, noise) for g in gains],
                                               [1e-5] * len(ks))
        if interval is not None:
            n += 1
            held += interval[0] <= bc <= interval[1]
    return held, n


@pytest.mark.parametrize("noise", [0.01, 0.03])
def test_the_interval_covers_the_data_orders_noise(noise, monkeypatch):
    """The branches train on one data order: every loss they reach moves with the batches drawn, as much
    as the evaluation's own noise or far more. Losses drawn about a known critical batch with that noise
    (independent per step and per branch, the evaluation's standard error tiny, as on the same held-out
    examples): the 90% interval holds the truth in at least 80% of 200 draws. The evaluation's error
    alone held it in under half of them."""
    rng = random.Random(1)

    def coverage() -> float:
        held, n = _coverage(800.0, 3000.0, noise, rng, 200)
        return held / n

    assert coverage() >= 0.8
    from largebatch.client import _branch_reading

    monkeypatch.setattr(_branch_reading, "_roughness", lambda line: 0.0)
    assert coverage() < 0.5


@pytest.mark.slow  # 6 cases x 100 noisy probes
@settings(max_examples=6, deadline=None)
@given(st.floats(0.6, 4.6), st.floats(1.0, 10.0), st.floats(0.005, 0.05), st.integers(0, 2**16))
def test_the_interval_covers_the_data_order_at_any_critical_batch_and_noise(log2_bc_over_b, tau_over_window,
                                                                             share, seed):
    """Beyond the one case above: any B_crit inside the branches' span, any curvature up to the probe's
    limit, data-order noise from 0.5% to 5% of the window's gain; the 90% interval holds the truth in at
    least 75% of 100 draws wherever it is read."""
    window = 64 * 100.0  # steps x batch of _coverage's smallest branch
    bc, tau = 100.0 * 2.0 ** log2_bc_over_b, tau_over_window * window
    final_gain = 0.5 * (1 - math.exp(-window / tau))  # _synthetic's gain after the window
    held, n = _coverage(bc, tau, share * final_gain, random.Random(seed), 100)
    assert n >= 50 and held / n >= 0.75, (held, n)


def test_a_branch_whose_loss_rose_is_named_in_the_note():
    """The reading counts a branch that ends above its start as a bigger batch's cost; the note says which
    branch, at which LR factor, so a reader can tell an overshooting LR from a small critical batch."""
    from largebatch.client._probe import _summarise

    rng = random.Random(3)
    base = [2.0 + 0.01 * rng.random() for _ in range(16)]
    steps, ks = 8, (1, 2, 4, 8)
    curve = {n: [b - 0.02 * n for b in base] for n in curve_steps(steps, ks)}
    per_k = {1: curve[steps], 2: [b - 0.15 for b in base], 4: [b - 0.1 for b in base], 8: [b + 0.05 for b in base]}
    factors = {1: 1.0, 2: 1.41, 4: 2.0, 8: 2.83}
    result = _summarise(4, steps, 4 * steps * 4, 15, base, per_k, curve, factors, 1)
    assert result.gains[8] < 0 < result.gains[4]
    assert "the k = 8 branch's loss rose over the window (at x2.83 the LR)" in result.note
    steady = _summarise(4, steps, 4 * steps * 4, 15, base, {**per_k, 8: [b - 0.05 for b in base]}, curve, factors, 1)
    assert "rose" not in steady.note


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 0.9999), min_size=1, max_size=3),
       st.lists(st.integers(0, 9), min_size=2, max_size=6, unique=True), st.integers(1, 8))
def test_every_branch_keeps_the_same_weight_on_the_moments_it_inherits(betas, exps, per_largest):
    """Whatever the betas, the multiples and the window, branch k's ``steps // k`` steps at beta^k leave the
    inherited moments the weight the k = 1 run would after the same examples: beta^steps (within rounding),
    and each beta^k stays in [0, 1)."""
    from largebatch.client._probe import _branch_betas

    ks = [2 ** e for e in exps]
    steps = per_largest * max(ks)
    for k in ks:
        mine = _branch_betas(betas, k)
        assert all(0.0 <= b < 1.0 for b in mine)
        for b, bk in zip(betas, mine, strict=True):
            assert bk ** (steps // k) == pytest.approx(b ** steps, rel=1e-9, abs=1e-300)
