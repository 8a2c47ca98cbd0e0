"""The noisy quadratic model's analytic critical batch is recovered by the engine and the streaming
estimator (benchmarks/noisy_quadratic.py)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "noisy_quadratic.py"


def _module():
    spec = importlib.util.spec_from_file_location("noisy_quadratic", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["noisy_quadratic"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_optimal_step_gains_the_noiseless_gain_over_one_plus_b_noise_over_b():
    nqm = _module()
    q = nqm.NQM.make(50, sigma2=10.0)
    m = np.random.default_rng(0).uniform(0.1, 2.0, 50)

    def after(lr, batch):
        return q.loss((1 - lr * q.h) ** 2 * m + lr**2 * q.c / batch)

    for batch in (1, 30, 1000):
        best = q.best_lr(m, batch)
        grid = best * np.linspace(0.9, 1.1, 201)
        assert after(best, batch) <= min(after(x, batch) for x in grid) + 1e-15
        gain, noiseless = q.loss(m) - after(best, batch), q.loss(m) - after(q.best_lr(m, 1e300), 1e300)
        assert gain == pytest.approx(noiseless / (1 + q.b_noise(m) / batch), rel=1e-12)


@pytest.mark.slow
def test_quick_mode_recovers_the_analytic_critical_batch_within_ten_percent():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    rows = [line for line in out.splitlines() if re.match(r"\| \d", line)]
    engine = [r for r in rows if r.count("|") == 7]
    branch = [r.split("|") for r in rows if r.count("|") == 9]
    assert len(branch) == 3
    for r in branch:  # the client's branch probe recovers the window's own critical batch
        window, fit = float(r[5]), float(r[6])
        assert float(r[7].strip(" %")) == pytest.approx(100 * (fit / float(r[4]) - 1), abs=0.1)
        assert abs(fit / window - 1) <= 0.10
    streaming = [r for r in rows if r.count("|") == 8]
    assert [int(r.split("|")[1]) for r in engine] == [16, 64, 256, 1024] and len(streaming) == 3
    for r in engine:
        assert abs(float(r.split("|")[4].strip(" %"))) <= 10
    # the last B_noise as one constant misses by more than the tolerance at 256x: the trajectory matters
    assert float(engine[-1].split("|")[6].strip(" %")) < -10
    for r in streaming:
        assert abs(float(r.split("|")[4].strip(" %"))) <= 10 and abs(float(r.split("|")[7].strip(" %"))) <= 10
    fitted = re.search(r"trajectory: [\d.e+]+ \(([-+\d.]+)%\)", out)
    assert fitted is not None and abs(float(fitted.group(1))) <= 10
    ramp = re.search(r"planned (\d+) steps, measured ([\d.]+) to the target \(([-+\d.]+)%\); (\d+)% fewer steps", out)
    assert ramp is not None and abs(float(ramp.group(3))) <= 10 and int(ramp.group(4)) >= 30
    assert "PASS" in out
