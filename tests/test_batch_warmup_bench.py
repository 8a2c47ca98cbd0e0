"""benchmarks/batch_warmup.py: its pure helpers, and its --quick run's output (both tasks, both parts, verdicts
that are computed words)."""

import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "batch_warmup.py"
# As in test_benchmarks_quick.py: an inherited TRITON_INTERPRET turns CPU optimizer steps into interpreter runs.
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
VERDICT = re.compile(r"^(non-inferior|inferior( \(.+\))?|undecided \(.+\))$")


def _module():
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("batch_warmup", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["batch_warmup"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_within_a_factor_is_symmetric_and_closed():
    bw = _module()
    assert bw.within(3.0, 3) and bw.within(1 / 3, 3) and bw.within(1.0, 2)
    assert not bw.within(3.01, 3) and not bw.within(0.33, 3) and not bw.within(2.5, 2)
    assert not bw.within(float("nan"), 3) and not bw.within(float("inf"), 3)


def test_the_branch_window_is_at_most_half_the_examples_seen():
    bw = _module()
    assert bw.window_multiple(128, 1e9, 4) == 128
    for seen in (100, 1000, 5000, 40_000):
        k = bw.window_multiple(128, seen, 4)
        assert k >= 2 and k & (k - 1) == 0
        assert 8 * k * 4 <= seen / 2 or k == 2
        assert k == 128 or 8 * (2 * k) * 4 > seen / 2  # the largest that fits
    assert bw.window_multiple(128, 10, 4) == 2  # never fewer than two branches


def test_a_longer_window_lowers_k_max_unless_the_share_lets_it_pass_the_examples_seen():
    bw = _module()
    # the MLP's first checkpoint (4,096 examples at B0 = 8): k_max 32 at 8 steps, 8 at 32, 4 at 64
    assert [bw.window_multiple(128, 4096, 8, w) for w in (8, 32, 64)] == [32, 8, 4]
    assert bw.window_multiple(128, 4096, 8) == bw.window_multiple(128, 4096, 8, bw.WINDOW, bw.WINDOW_SHARE) == 32
    assert [bw.window_multiple(128, 4096, 8, w, share=64) for w in (8, 32, 64)] == [128, 128, 128]
    assert bw.window_multiple(128, 4096, 8, 32, share=8) == 128 and bw.window_multiple(128, 4096, 8, 32, share=4) == 64


def test_the_branch_lr_power_patches_the_probe_only_inside_and_gives_it_back():
    bw = _module()
    from largebatch.client import _probe

    rule = _probe._lr_factor
    with bw.lr_power(1):
        assert _probe._lr_factor is rule
    with bw.lr_power(0):
        assert _probe._lr_factor("adamw", 64, 8, None) == 1.0
    with bw.lr_power(0.5):
        assert _probe._lr_factor("adamw", 64, 8, None) == pytest.approx(rule("adamw", 64, 8, None) ** 0.5)
    assert _probe._lr_factor is rule
    with pytest.raises(RuntimeError), bw.lr_power(0):
        raise RuntimeError
    assert _probe._lr_factor is rule


def _checkpoint(fraction, branched, interval, note, gains, streaming):
    ks = sorted(gains)
    return {"fraction": fraction, "examples": int(fraction * 1000), "branched": branched, "interval": interval,
            "ks": ks, "note": note, "streaming": streaming, "gains": {str(k): g for k, g in gains.items()},
            "gain_se": {str(k): 0.001 for k in ks}, "lr_factors": {str(k): k ** 0.5 for k in ks}}


def test_summarize_reads_each_runs_json_and_labels_it_by_its_flags(tmp_path):
    bw = _module()
    runs = {"d": ({"moment_memory": "examples", "kmax": 128}, [_checkpoint(0.1, 20.0, [10.0, 30.0], "B_crit 20", {1: 0.02, 2: 0.03, 4: -0.01}, 200.0),
                       _checkpoint(0.5, None, [0.0, 1.0], "the k = 1 branch gained 0.001 (...): no resolved progress",
                                   {1: 0.001, 2: 0.02}, 300.0)]),
            # a run from before moment_memory: its branches kept the run's betas
            "w": ({"window": 32, "window_share": 64.0, "lr_power": 0.5, "branch_seed": 1},
                  [_checkpoint(0.1, 150.0, [100.0, math.inf], "B_crit 150", {1: 0.05, 2: 0.05, 4: 0.04}, 200.0),
                   _checkpoint(0.5, None, [900.0, math.inf], "the bigger batches cost no examples (...)",
                               {1: 0.03, 2: 0.04}, 300.0)])}
    for name, (setup, cps) in runs.items():
        (tmp_path / name).mkdir()
        data = {"seconds": 12.0, "setup": {"parts": [1], **setup},
                "tasks": [{"task": "mlp", "b0": 8, "checkpoints": cps}]}
        (tmp_path / name / "batch_warmup.json").write_text(json.dumps(data))
    table = bw.summarize([tmp_path / "d", tmp_path / "w"])
    rows = [line for line in table.splitlines() if line.startswith("| mlp |")]
    assert len(rows) == 6
    assert rows[0].startswith("| mlp | 0.1 | 100 | (the defaults) | 8..32 | 8 | 20 (10..30) | 0.0200 (0.0010) | -0.0100")
    assert "| 200 | 10.00 | **no** |" in rows[0]
    assert rows[1].startswith("| mlp | 0.1 | 100 | --window 32 --window-share 64 --branch-lr-power 0.5 --branch-seed 1 --moment-memory steps |")
    assert "| 150 (100..inf) |" in rows[1] and "| 1.33 | yes |" in rows[1]
    assert "k = 1 branch: no resolved gain" in rows[2] and "above 16 (no cost seen)" in rows[3]
    assert "| mlp | (the defaults) | 1/2 | 0/2 | 10.00 | 1/2 | 12s |" in table
    assert "| mlp | --window 32 --window-share 64 --branch-lr-power 0.5 --branch-seed 1 --moment-memory steps | 1/2 | 1/2 | 1.33 | 0/2 |" in table


@pytest.mark.slow
def test_parts_1_runs_the_critical_batch_along_the_run_alone(tmp_path):
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--tasks", "mlp", "--parts", "1", "--window", "16",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "batch_warmup.md").read_text()
    assert "Critical batch along the reference run at B0 (quick mode" in table and "largest branch 16 steps" in table
    assert "Batch warmup end to end" not in table and "ramp" not in table
    data = json.loads((tmp_path / "batch_warmup.json").read_text())
    assert data["setup"]["parts"] == [1] and data["setup"]["window"] == 16
    (t,) = data["tasks"]
    assert t["task"] == "mlp" and len(t["checkpoints"]) == 2 and not t["arms"]
    for c in t["checkpoints"]:
        assert set(c["gains"]) == {str(k) for k in c["ks"]} and c["curve"]


def test_verdicts_follow_the_bounds_and_holm():
    bw = _module()
    from largebatch.scaling_rules import stats

    better = stats.non_inferiority([-0.02, -0.03, -0.025, -0.021, -0.028], 0.005)
    assert bw.verdict(better, True, 0.05, 2) == "non-inferior"
    worse = stats.non_inferiority([0.03, 0.032, 0.029, 0.031, 0.035], 0.005)
    assert bw.verdict(worse, False, 0.05, 2) == "inferior"
    straddle = stats.non_inferiority([0.01, -0.01, 0.004, -0.002, 0.012], 0.005)
    word = bw.verdict(straddle, False, 0.05, 2)
    assert word.startswith("undecided (") and "upper bound" in word
    # below the margin at 5% but not at Holm's 2.5%: undecided, and it says why
    edge = stats.non_inferiority([0.002 + 0.003 * z / 2.5 ** 0.5 for z in (-2, -1, 0, 1, 2)], 0.005)
    assert edge.upper < edge.margin and edge.p > 0.025
    assert "Holm" in bw.verdict(edge, False, 0.05, 2)


def test_compare_pairs_by_seed_and_applies_holm_over_the_two_peers():
    bw = _module()
    res = bw.TaskResult("mlp", 4, 100, 1.0)
    ramp = [1.000, 1.002, 0.999, 1.001, 1.000]
    res.arms = {"ramp": {"losses": ramp, "diverged": [False] * 5},
                "B0": {"losses": [x * 1.0005 for x in ramp], "diverged": [False] * 5},
                "64B0": {"losses": [x * 1.05 for x in ramp], "diverged": [False] * 5}}
    bw.compare(res)
    assert [t["peer"] for t in res.tests] == ["B0", "64B0"]
    assert all(t["verdict"] == "non-inferior" for t in res.tests), res.tests
    assert res.tests[0]["differences"] == pytest.approx([1 / 1.0005 - 1] * 5)
    res.arms["ramp"]["diverged"][2] = True
    res.tests = []
    bw.compare(res)
    assert all(t["verdict"].startswith("inferior (the ramp diverged") for t in res.tests)


def test_the_reference_budget_arm_joins_holm_and_prices_the_plans_extra_examples():
    bw = _module()
    res = bw.TaskResult("lm", 4, 100, 1.0)
    ramp = [1.000, 1.002, 0.999, 1.001, 1.000]
    res.arms = {"ramp": {"losses": ramp, "diverged": [False] * 5, "steps": 40, "examples": 440},
                "B0": {"losses": [x * 0.995 for x in ramp], "diverged": [False] * 5, "steps": 110, "examples": 440},
                "64B0": {"losses": [x * 1.05 for x in ramp], "diverged": [False] * 5, "steps": 2, "examples": 512},
                "B0-ref": {"losses": [x * (1.0005 + 0.0001 * i) for i, x in enumerate(ramp)],
                           "diverged": [False] * 5, "steps": 100, "examples": 400}}
    bw.compare(res)
    assert [t["peer"] for t in res.tests] == ["B0", "64B0", "B0-ref"]
    assert all(t["verdict"] == "non-inferior" for t in res.tests), res.tests
    # Holm over three: the smallest p must clear 0.05 / 3 where two peers asked only 0.025
    two = bw.TaskResult("lm", 4, 100, 1.0)
    two.arms = {k: v for k, v in res.arms.items() if k != "B0-ref"}
    bw.compare(two)
    assert [t["peer"] for t in two.tests] == ["B0", "64B0"]
    text = bw._overhead_value(res)
    assert text.startswith("B0 on the ramp's examples (+10.0% over the reference's) against B0-ref: -0.5")
    assert bw._saved(40, 100) == "40 / 100: 60% fewer (>= 30%: yes)"
    assert bw._saved(90, 100).endswith("(>= 30%: **no**)")


@pytest.mark.slow
def test_quick_run_writes_both_parts_for_both_tasks(tmp_path):
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"elapsed \d+\.\ds", proc.stdout)
    table = (tmp_path / "batch_warmup.md").read_text()
    assert "Critical batch along the reference run at B0 (quick mode" in table
    assert "Batch warmup end to end (quick mode" in table
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| lm |") or line.startswith("| mlp |")]
    for task in ("lm", "mlp"):
        mine = [r for r in rows if r[0] == f"| {task}"]
        assert sum(len(r) == 18 for r in mine) == 2, mine  # the quick run's two checkpoints, every estimate's columns
        assert {r[1] for r in mine if len(r) == 9} == {"ramp", "B0", "64B0", "B0-ref"}
        tests = [r for r in mine if len(r) == 10]
        assert [r[1] for r in tests] == ["ramp vs B0", "ramp vs 64B0", "ramp vs B0-ref"]
        for r in tests:
            assert VERDICT.match(r[8]), r[8]
        for r in (tests[0], tests[2]):
            assert re.search(r"\d+ / \d+: -?\d+% fewer \(>= 30%: (yes|\*\*no\*\*)\)", r[9]), r[9]
        assert re.search(rf"- {task}: B0 on the ramp's examples \([+-]\d+\.\d% over the reference's\) against "
                         r"B0-ref: [+-]\d+\.\d+% \[", table)
        assert f"- {task}: reference run at B0 " in table and "power (80%" in table and "quick mode: 3 seeds" in table
    data = json.loads((tmp_path / "batch_warmup.json").read_text())
    assert data["quick"] is True and [t["task"] for t in data["tasks"]] == ["lm", "mlp"]
    for t in data["tasks"]:
        assert len(t["checkpoints"]) == 2 and len(t["tests"]) == 3
        assert all(len(a["losses"]) == 3 for a in t["arms"].values())
        assert t["arms"]["ramp"]["examples"] == t["arms"]["B0"]["examples"]
        # the reference's own budget: its steps at B0, fewer examples than the same-loss ramp spends
        assert t["arms"]["B0-ref"]["examples"] == t["ref_steps"] * t["b0"] <= t["arms"]["ramp"]["examples"]


def test_seeds_and_first_seed_pick_the_compared_seeds(tmp_path):
    bw = _module()
    for bad in (["--seeds", "2"], ["--first-seed", "-1"], ["--first-seed", "990", "--seeds", "20"]):
        with pytest.raises(SystemExit):
            bw.main([*bad, "--out", str(tmp_path)])
    s = bw.dataclasses.replace(bw.setup(False, None), first_seed=100, seeds=12)
    n, text = bw.power([0.001, 0.002, 0.0], [-0.01, -0.012, -0.011], 0.005, s, [0.001, 0.0, 0.002])
    assert n == 12 and text.endswith("; ran 12 as --seeds asked (seeds 100..111)")
