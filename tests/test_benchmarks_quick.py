"""Every benchmark's --quick mode runs in CI, so the scripts that produce the README's figures keep
working. (Figures are never asserted: timings are for the README, not for tests.)"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The benchmarks measure what users get. tests/client/optim/conftest.py sets TRITON_INTERPRET for the
# whole pytest process (the fused kernels' CPU tests); inherited, it turned optimizer_step's CPU
# "(fused=True)" rows into Triton-interpreter runs (358 s for --quick, past the 300 s timeout).
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.mark.slow
# (service_load.py has its own smoke test, in tests/service/test_benchmark_smoke.py)
@pytest.mark.parametrize("script, out_flag", [("optimizer_step", "--json"), ("store", "--out")])
def test_benchmark_quick(tmp_path, script, out_flag):
    pytest.importorskip("torch" if script == "optimizer_step" else "fastapi")
    out = tmp_path / ("results.json" if out_flag == "--json" else "out")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", out_flag, str(out)],
                          capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.exists() and (out.is_file() or any(out.iterdir())), proc.stdout[-2000:]


VERDICT_WORDS = {"non-inferior", "inferior", "undecided"}
RULES = ("largebatch", "largebatch+evidence", "largebatch-adamw", "largebatch-adamw+evidence", "adamw-linear",
         "adamw-sqrt", "lamb-sqrt")


def _sections(table: str) -> dict[str, list[str]]:
    """Each markdown table of the report by its header line, with its rows (the separator dropped)."""
    return {block.splitlines()[0]: block.splitlines()[2:] for block in table.split("\n\n") if block.startswith("|")}


def _verdict_rows(table: str) -> list[dict[str, str]]:
    head, rows = next((h, r) for h, r in _sections(table).items() if "| verdict | why |" in h)
    names = [c.strip() for c in head.strip("|").split("|")]
    for column in ("one-sided 95% upper", "one-sided 95% lower", "margin", "p", "held-out seeds"):
        assert column in names, head
    return [dict(zip(names, (c.strip() for c in row.strip("|").split(" | ")), strict=True)) for row in rows]


@pytest.mark.slow
def test_scaling_fidelity_quick(tmp_path):
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling_fidelity.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "scaling_fidelity.md").read_text()
    data = json.loads((tmp_path / "scaling_fidelity.json").read_text())
    for task in ("lm", "mlp"):
        # the power calculation's inputs and choice, printed and kept in the report
        line = next(line for line in proc.stdout.splitlines() if line.startswith(f"power: {task}: sd of paired"))
        for word in ("margin", "alpha 0.05", "power 0.8", "running 3 held-out seeds"):
            assert word in line, line
        assert line in table
        assert data["plans"][task]["n"] == 3 and data["plans"][task]["margin"] == {"lm": 0.01, "mlp": 0.005}[task]
        for name in RULES:  # seed 0's table (the tuning seed's runs)
            assert sum(f"| {task} | {s}x | {name} |" in table for s in (4, 16, 64)) == 3, (task, name)
        assert sum(f"| {task} | {s}x | oracle (" in table for s in (4, 16, 64)) == 3, task
        assert sum(f"| {task} | {s}x | AdamW sweep (best) |" in table for s in (4, 16, 64)) == 3, task
        assert sum(line.startswith(f"| {task} | {s}x | ") and "(B_noise " in line
                   for s in (4, 16, 64) for line in table.splitlines()) == 3, task
    assert "quick mode: 3 held-out seeds of a shrunken task: its verdicts are not powered" in proc.stdout
    seeds = {r["seed"] for r in data["results"]}
    assert seeds == {0, 1, 2, 3, 4}, seeds
    rows = _verdict_rows(table)
    # four candidates x three peers x three scales x two tasks, each a verdict from the computed set
    assert len(rows) == 72, len(rows)
    # the AdamW study's runs at 4x and 16x move the engine's AdamW recipe at 64x off the empty store's
    for task in ("lm", "mlp"):
        lr = {r["name"]: r["lr"] for r in data["results"] if r["task"] == task and r["scale"] == 64 and r["seed"] == 0}
        assert lr["largebatch-adamw+evidence"] != lr["largebatch-adamw"], (task, lr)
    assert {row["scaled from"] for row in rows} == {"both lamb", "both adamw", "lamb / adamw", "adamw / lamb"}
    # the two references at B0, paired over the held-out seeds
    gap = [line for line in table.splitlines() if line.startswith(("| lm | ", "| mlp | ")) and line.count("[") == 1
           and line.split(" | ")[3] == "3"]
    assert len(gap) == 2, table
    for row in rows:
        assert row["verdict"] in VERDICT_WORDS, row
        assert row["held-out seeds"] in {"2", "3"} or "diverged" in row["why"], row
        if row["verdict"] == "undecided" and row["one-sided 95% upper"] != "-":
            assert "seeds would decide" in row["why"], row
        if row["verdict"] == "non-inferior" and row["one-sided 95% upper"] != "-":
            assert float(row["one-sided 95% upper"].rstrip("%")) < float(row["margin"].rstrip("%")), row
    assert (tmp_path / "scaling_fidelity.png").stat().st_size > 10_000
    # --merge rebuilds the same table (and a plot) from the JSON, without training
    merged = tmp_path / "merged"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling_fidelity.py"), "--merge", str(tmp_path),
                           "--out", str(merged)], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (merged / "scaling_fidelity.md").read_text() == table
    assert (merged / "scaling_fidelity.png").stat().st_size > 10_000


@pytest.mark.slow
def test_critical_batch_quick(tmp_path):
    """Steps-to-target with the LR tuned on tuning seeds and fresh seeds at it, bootstrap intervals, the
    hyperbola's residual, the dose-response, and verdicts that follow from the intervals printed."""
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "critical_batch.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "critical_batch.md").read_text()
    out = json.loads((tmp_path / "critical_batch.json").read_text())
    results = {r["task"]: r for r in out["results"]}
    assert {"lm", "mlp", "mlp q=0.3"} <= set(results), set(results)
    sections = {block.splitlines()[0]: [row.split(" | ") for row in block.splitlines()[2:]]
                for block in table.split("\n\n") if block.startswith("| ")}

    def section(head: str) -> list[list[str]]:
        return next(rows for h, rows in sections.items() if h.startswith(head))

    verdicts = ("yes", "**no**", "undecided (", "not scored (")
    for name, r in results.items():
        assert len(r["points"]) >= 4
        seen: set[int] = set()
        for p in r["points"]:
            assert len(p["seeds"]) == out["fresh_seeds"] == 3 and len(p["seed_steps"]) == 3  # fresh seeds per batch
            assert not set(p["seeds"]) & ({0, 1} | seen)  # never the tuning seeds, nor another batch's
            seen |= set(p["seeds"])
            assert len(p["grid"]) >= 2  # the LR tuned on a grid
        lo, hi = r["b_crit_ci"]
        assert r["b_noise"] > 0 and 0 < r["b_crit"] and lo <= r["b_crit"] <= hi, (name, r["b_crit"], lo, hi)
        assert 0 <= r["rms"] < 1 and r["fits"] == (r["rms"] <= 0.15)
    by_task = {row[0][2:]: row for row in section("| task | target val loss | S_min | B_crit (95% CI)")}
    assert set(by_task) == set(results)
    for name, row in by_task.items():
        assert row[3].startswith(f"{results[name]['b_crit']:.1f} [") and row[4].endswith("%")  # CI, residual
        ratio_lo, ratio_hi = (float(x) for x in row[7].split("[")[1].rstrip("]").split(", "))
        for cell, band in ((row[8], 3), (row[9], 2)):  # within 3x, within 2x: computed from the interval
            assert cell.startswith(verdicts), cell
            if not results[name]["fits"]:
                assert cell.startswith("not scored (")
            elif cell == "yes":
                assert 1 / band <= ratio_lo and ratio_hi <= band, row
            elif cell == "**no**":
                assert ratio_hi < 1 / band or ratio_lo > band, row
    ratios = section("| task | scale | E(B)/E(B0) measured (95% CI)")
    for name in ("lm", "mlp"):
        rows = [row for row in ratios if row[0] == f"| {name}"]
        assert [row[1] for row in rows] == ["16x", "64x"]
        assert all("[" in row[2] and row[5].startswith(verdicts) for row in rows), rows
    dose = section("| label noise q |")
    assert [row[0] for row in dose] == ["| 0", "| 0.3"]
    assert dose[1][5].count("[") == 1 and dose[1][8].rstrip(" |").startswith(verdicts), dose
    # the same test with B_noise read where the pilot crosses its target (the same depth as B_crit)
    assert float(dose[1][9]) > 0 and dose[1][12].rstrip(" |").startswith(verdicts), dose
    assert len(section("| task | pilot steps probed |")) == 2  # the local probes, one row per task
    assert "3 fresh seeds per batch" in table and "Elapsed " in table


@pytest.mark.slow
def test_scaling_fidelity_seeds_table(tmp_path):
    """--seeds 4 overrides the power calculation: every rule and the oracle's recipe at 4 held-out seeds,
    none of them the tuning seed or the pilot, and the tests read only those."""
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling_fidelity.py"), "--quick", "--tasks", "mlp",
                           "--seeds", "4", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "running 4 held-out seeds (--seeds 4 overrides the calculation)" in proc.stdout
    table = (tmp_path / "scaling_fidelity.md").read_text()
    results = json.loads((tmp_path / "scaling_fidelity.json").read_text())["results"]
    assert {r["seed"] for r in results} == {0, 1, 2, 3, 4, 5}
    # the sweeps and the oracle grid run at the tuning seed only
    assert {r["seed"] for r in results if r["name"] in ("ref-sweep-lamb", "ref-sweep-adamw",
                                                          "largebatch-sweep")} == {0}
    # an AdamW LR sweep beside the LAMB grid at every scale, on the tuning seed: the oracle sweeps both
    assert {(r["scale"], r["seed"]) for r in results if r["name"] == "oracle-grid-adamw"} == {(4, 0), (16, 0), (64, 0)}
    # the two tuned references run again at every seed: their gap is no scaling rule's doing
    for name in ("reference", "reference-adamw"):
        assert {r["seed"] for r in results if r["name"] == name} == {0, 1, 2, 3, 4, 5}, name
    assert "held-out seeds: 2, 3, 4, 5 (tuning seed 0 and pilot seed 1" in table
    for scale in (4, 16, 64):
        for seed in range(1, 6):
            again = [r for r in results if r["scale"] == scale and r["seed"] == seed]
            assert set(RULES) <= {r["name"] for r in again}
            # the oracle's recipe, not the grids
            assert sum(r["name"] in ("oracle-grid", "oracle-grid-adamw") for r in again) <= 1
    rows = _verdict_rows(table)
    assert len(rows) == 36 and {r["verdict"] for r in rows} <= VERDICT_WORDS
    # a test over held-out seeds only: recompute one row's mean from the JSON (tuning seed left out)
    row = next(r for r in rows if r["one-sided 95% upper"] != "-" and "diverged" not in r["why"])
    scale = int(row["scale"].rstrip("x"))

    def loss(name, seed):
        return next(r["val_loss"] for r in results if r["scale"] == scale and r["name"] == name and r["seed"] == seed)

    diffs = [loss(row["candidate"], s) / loss(row["peer"], s) - 1 for s in range(2, 6)]
    assert row["mean (candidate/peer - 1)"] == f"{sum(diffs) / 4:+.2%}", (row, diffs)
    # the held-out regret table: one row per scale, an interval per rule
    regrets = next(r for h, r in _sections(table).items() if "regret [95% CI]" in h)
    assert len([line for line in regrets if line.startswith("| mlp | ")]) == 3


@pytest.mark.slow
def test_engine_versions_quick(tmp_path):
    """The engine timed beside engine v2, exported from this repository's history (a clone without that
    commit, e.g. a shallow one, cannot run the comparison)."""
    peer = "240fcbe"
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{peer}^{{commit}}"]).returncode:
        pytest.skip(f"this clone lacks commit {peer}")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engine_versions.py"), "--quick", "--peer", peer],
                          capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and " us | " in line]
    assert len(rows) == 2 and all(line.endswith("x |") for line in rows), proc.stdout


def test_evidence_bend_quick():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "evidence_bend.py"), "--seeds", "2"],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| bend |", "| power law |"))]
    assert len(rows) == 8, proc.stdout
    for row in rows:
        cells = row.strip("|").split(" | ")
        assert len(cells) == 9 and cells[-2].strip().endswith("/2"), row


def test_warmup_cost_quick(tmp_path):
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "warmup_cost.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| mlp | 64x |")]
    # the sweep's 0, 1, 4 steps and the engine's linear-epoch warmup at 64x of the quick task's 12 steps
    assert [row.split(" | ")[3] for row in rows] == ["0", "1", "3", "4"], proc.stdout
    assert rows[1].split(" | ")[6] == "-" and all(" [" in rows[i].split(" | ")[6] for i in (0, 2, 3)), proc.stdout
    assert "LAMB-sqrt" in rows[0] and "the engine's rule" in rows[2]  # 0.005 of 12 steps: no warmup
    runs = json.loads((tmp_path / "warmup_cost.json").read_text())
    assert len(runs) == 8 and {r["seed"] for r in runs} == {2, 3}
