"""The network fails, the service dies, the user hits Ctrl-C: no report is lost or duplicated."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

torch = pytest.importorskip("torch")

from largebatch.client import APIConnectionError, Client, NotFoundError  # noqa: E402

from ._training import BATCH, REFERENCE, Data, evaluate, make_model, train  # noqa: E402

pytestmark = pytest.mark.slow  # against a `largebatch serve` subprocess (conftest.py)


def test_killing_the_service_mid_training_loses_and_duplicates_nothing(own_service):
    service = own_service.start()
    client = Client(service.url, timeout=5.0)
    model = make_model()
    job = client.autoconfigure(model, study="outage", reference=REFERENCE, target_batch_size=BATCH,
                               job_options={"flush_interval": 0.05, "max_batch": 20, "close_timeout": 60})
    total = job.recipe.total_steps
    slowest = {"down": 0.0}
    timeline = {}

    def on_step(step):
        if step == 80:
            service.kill()  # SIGKILL: requests in flight just drop
            timeline["killed"] = step
        if step == 200:
            timeline["pending"], timeline["delivered"] = job.pending, job.delivered
            timeline["error"] = job._reporter.last_error
            # what piles up holds numbers, not autograd graphs (and through them, activations)
            timeline["graphs"] = sum(getattr(loss, "grad_fn", None) is not None
                                     for loss, *_ in job._reporter._pending.values())
            service.start()
            timeline["back"] = step

    data = Data()
    times = []

    def timed(step):  # called after each training step
        now = time.perf_counter()
        if times and "killed" in timeline and "back" not in timeline:
            slowest["down"] = max(slowest["down"], now - times[-1])  # one step, report() included
        on_step(step)
        times.append(time.perf_counter())  # (not counting the test's own kill / restart)
        if 90 <= step < 200:
            time.sleep(0.005)  # give the reporter time to fail and back off while the service is down

    with job:
        _, losses = train(job, model, total, data, on_step=timed)
        # While the service was down, the loop kept going: no step waited on the network.
        assert len(losses) == total
        assert slowest["down"] < 0.5, slowest
        run = job.complete(evaluate(model))

    assert run.state == "completed"
    # The outage was real: the reporter failed to connect and reports piled up meanwhile.
    assert isinstance(timeline["error"], APIConnectionError), timeline
    assert timeline["pending"] >= 110 and timeline["delivered"] <= 81, timeline
    assert timeline["graphs"] == 0, timeline
    reports = service.store.reports(run.id)
    assert [r.step for r in reports] == list(range(total))  # every step, once
    assert [r.loss for r in reports] == losses  # and the values that were sent
    assert job.delivered == total and job.pending == 0
    assert service.store.get_run(run.id).state == "completed"


def test_offline_fallback_opens_the_run_when_the_service_comes_back(own_service):
    client = Client(own_service.url, max_retries=0, timeout=2.0)  # nothing listens there yet
    model = make_model()
    job = client.autoconfigure(model, study="offline", reference=REFERENCE, target_batch_size=BATCH,
                               offline_fallback=True, job_options={"flush_interval": 0.05})
    assert job.run is None and type(job.optimizer).__name__ == "LAMB"
    _, losses = train(job, model, 60)
    assert job.pending > 0 and job.delivered == 0
    own_service.start()
    run = job.complete(evaluate(model))
    assert run.state == "completed" and run.study == "offline"
    assert run.recipe_hash == job.recipe.fingerprint()
    assert [r.loss for r in own_service.store.reports(run.id)] == losses


CHILD = textwrap.dedent("""
    import signal, sys, time, torch
    from largebatch.client import Client

    # A script run from a terminal: a test runner started in the background (`cmd &` in a non-interactive
    # shell) passes SIGINT down ignored, and Python then installs no KeyboardInterrupt for it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    url, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Linear(8, 1)
    job = Client(url).autoconfigure(
        model, study="ctrl-c-" + mode, target_batch_size=64, target_steps=100000,
        reference={"batch_size": 8, "lr": 1e-3, "steps": 100000},
        job_options={"flush_interval": 3600, "max_batch": 10000})  # nothing is sent before exit
    print("run", job.run.id, flush=True)

    def loop():
        for step in range(job.recipe.total_steps):
            x = torch.randn(64, 8)
            loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
            job.optimizer.zero_grad(); loss.backward(); job.optimizer.step(); job.scheduler.step()
            job.report(step, loss.item())
            print("step", step, flush=True)
            time.sleep(0.002)

    if mode == "with":
        with job:
            loop()
    else:
        loop()   # no context manager: the atexit hook flushes
""")


@pytest.mark.parametrize("mode", ["with", "plain"])
def test_ctrl_c_loses_no_report(service, tmp_path, mode):
    script = tmp_path / "train.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), service.url, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        run_id = None
        last = -1
        for line in proc.stdout:
            if line.startswith("run "):
                run_id = int(line.split()[1])
            elif line.startswith("step "):
                last = int(line.split()[1])
                if last == 150:
                    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
                    break
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    last = max([last] + [int(x.split()[1]) for x in rest.splitlines() if x.startswith("step ")])
    assert proc.returncode != 0 and "KeyboardInterrupt" in err, err[-2000:]
    steps = [r.step for r in service.store.reports(run_id)]
    # Every step reported before the interrupt arrived, once (the one in progress may be there too).
    assert steps[: last + 1] == list(range(last + 1)) and len(steps) in (last + 1, last + 2), (last, steps[-3:])
    run = service.store.get_run(run_id)
    if mode == "with":
        assert run.state == "failed" and run.reason == "interrupted (KeyboardInterrupt)"
    else:
        assert run.state == "running"  # no outcome is guessed; the lease will expire


class _LosesFirstAnswers(httpx.BaseTransport):
    """Delivers every request to the real service, but loses the answers to the first ``n`` writes:
    the service acted, the client never heard."""

    def __init__(self, n: int) -> None:
        self._inner = httpx.HTTPTransport()
        self._left = n

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        if request.method != "GET" and self._left > 0:
            self._left -= 1
            response.read()
            response.close()
            raise httpx.ReadTimeout("answer lost", request=request)
        return response


@pytest.mark.parametrize("lost", [1, 2])
def test_writes_whose_answers_are_lost_are_retried_without_spurious_errors(service, lost):
    with httpx.Client(transport=_LosesFirstAnswers(lost)) as http:
        client = Client(service.url, http_client=http, max_retries=lost)
        name = f"lossy-{lost}"
        study = client.create_study(name, model_params=1000)  # not AlreadyExistsError on the retry
        assert study.name == name
        run = client.create_run(name, request={"model": {"params": 1000}, "target": {"batch_size": 64},
                                               "reference": {"batch_size": 8, "lr": 1e-3, "steps": 100}})
        assert run.state == "running"
        assert service.store.list_runs("default", name).total == 1  # one run, however many tries
        http._transport._left = lost  # type: ignore[attr-defined]
        client.delete_study(name)  # not NotFoundError on the retry
    with pytest.raises(NotFoundError):
        Client(service.url).get_study(name)
