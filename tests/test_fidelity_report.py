"""The verdicts of benchmarks/scaling_fidelity.py (benchmarks/_fidelity_report.py) on made-up runs: which
seeds a test reads, how Holm and the margin decide, what a diverged run does, how many seeds the pilot asks for."""

import math
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _fidelity_report as fr


def _runs(losses: dict[str, list[float | None]], scale: int = 4, task: str = "mlp") -> list[fr.Result]:
    """One run per (rule, seed), seed = position in the list; None is a diverged run."""
    return [fr.Result(task, scale, name, 8, 0.01, 100, math.nan if v is None else v, v is None, 0.0, seed=seed)
            for name, values in losses.items() for seed, v in enumerate(values)]


def _by_peer(rows: list[dict]) -> dict[str, dict]:
    return {r["peer"]: r for r in rows}


def test_only_held_out_seeds_enter_the_test():
    """Seeds 0 (tuning) and 1 (pilot) say largebatch is 50% worse; the held-out seeds say it is equal."""
    held = [1.00, 1.01, 0.99, 1.02, 1.00]
    rs = _runs({"largebatch": [1.5, 1.5, *held], **{p: [1.0, 1.0, *held] for p in fr.PEERS}})
    for row in fr.verdicts(rs, "mlp", 4, "largebatch"):
        assert row["test"].n == 5 and row["test"].mean == 0.0 and row["test"].sd == 0.0
        assert row["verdict"] == "non-inferior", row


def test_margin_decides_and_holm_corrects():
    base = [1.00, 1.01, 0.99, 1.02, 1.00, 1.01]
    jitter = [0.0, 0.0005, -0.0005, 0.0003, -0.0003, 0.0001]
    rs = _runs({
        "largebatch": [None, None, *base],  # its tuning-seed divergences are not held against it
        "adamw-linear": [1.0, 1.0, *(b * (1 - 0.02) for b in base)],  # largebatch 2% worse: inferior
        "adamw-sqrt": [1.0, 1.0, *(b * (1 + 0.003 + j) for b, j in zip(base, jitter, strict=True))],  # clearly fine
        "lamb-sqrt": [1.0, 1.0, *(b / (1 + 0.004 + j * 10) for b, j in zip(base, jitter, strict=True))],  # just inside the margin
    })
    rows = _by_peer(fr.verdicts(rs, "mlp", 4, "largebatch"))
    assert rows["adamw-linear"]["verdict"] == "inferior" and "lower bound" in rows["adamw-linear"]["why"]
    assert rows["adamw-sqrt"]["verdict"] == "non-inferior"
    assert rows["lamb-sqrt"]["verdict"] == "undecided"
    assert "upper bound" in rows["lamb-sqrt"]["why"] and "seeds would decide" in rows["lamb-sqrt"]["why"]


def test_holm_threshold_is_applied():
    """Three peers with the same p just under alpha: uncorrected each is 'non-inferior', Holm keeps none."""
    d = [0.0, 0.008]  # two held-out seeds, shrunk until p lies between alpha/3 and alpha
    target = None
    for scale in (x / 100 for x in range(1, 200)):
        t = fr.non_inferiority([v * scale for v in d], fr.MARGINS["mlp"])
        if 0.0167 < t.p < 0.05:
            target = [v * scale for v in d]
            break
    assert target is not None
    losses = {"largebatch": [1.0, 1.0, 1.0 + target[0], 1.0 + target[1]]}
    losses.update({p: [1.0, 1.0, 1.0, 1.0] for p in fr.PEERS})
    rows = fr.verdicts(_runs(losses), "mlp", 4, "largebatch")
    assert all(r["test"].p < 0.05 for r in rows)
    assert all(r["verdict"] == "undecided" and "fails Holm over 3" in r["why"] for r in rows), rows


def test_diverged_runs():
    ok = [1.0, 1.0, 1.0, 1.01, 0.99]
    rs = _runs({"largebatch": [1.0, 1.0, 1.0, None, 0.99], **{p: ok for p in fr.PEERS}})
    assert all(r["verdict"] == "inferior" and "diverged at 1/3" in r["why"]
               for r in fr.verdicts(rs, "mlp", 4, "largebatch"))
    rs = _runs({"largebatch": ok, "adamw-linear": [1.0, 1.0, None, None, None], "adamw-sqrt": ok,
                "lamb-sqrt": [1.0, 1.0, None, 1.0, 0.99]})
    rows = _by_peer(fr.verdicts(rs, "mlp", 4, "largebatch"))
    assert rows["adamw-linear"]["verdict"] == "non-inferior" and "peer diverged at 3/3" in rows["adamw-linear"]["why"]
    assert rows["lamb-sqrt"]["test"].n == 2 and "left out" in rows["lamb-sqrt"]["why"]


def test_the_pilot_sets_the_seed_count():
    # paired differences at seed 0 and seed 1 differ by 2% everywhere: sd = 2% / sqrt(2)
    rs = []
    for scale in fr.SCALES:
        rs += _runs({"largebatch": [1.0, 1.0], "largebatch+evidence": [1.0, 1.0],
                     **{p: [1.0, 1 / 1.02] for p in fr.PEERS}}, scale=scale, task="lm")
    sd, pairs = fr.pilot_spread(rs)
    assert pairs == 18
    assert sd == pytest.approx(math.sqrt((0.02) ** 2 / 2), rel=1e-3)
    want = fr.seeds_for_margin(sd, 0.01, tests=3, minimum=2)
    plan = fr.seed_plan(rs, "lm", minimum=5, cap=64)
    assert plan["wanted"] == want and plan["n"] == max(5, want) and plan["margin"] == 0.01
    assert "power 0.8" in fr.plan_line(plan) and f"running {plan['n']} held-out seeds" in fr.plan_line(plan)
    capped = fr.seed_plan(rs, "lm", minimum=5, cap=6)
    assert capped["n"] == 6 and "underpowered" in capped["why"]
    over = fr.seed_plan(rs, "lm", minimum=5, cap=2)
    assert over["n"] == 5 and "the minimum (5), over the time budget's cap (2)" in over["why"]  # the minimum wins
    assert fr.seed_plan(rs, "lm", minimum=5, cap=64, override=3)["n"] == 3


def _write(d: Path, rs: list[fr.Result], plan: dict) -> Path:
    """What a process of scaling_fidelity.py leaves: its report, whose JSON --merge reads."""
    d.mkdir()
    refs = [fr.Result("mlp", 1, "reference", 8, 0.01, 100, 1.0, False, 0.0, warmup_ratio=0.005, seed=s)
            for s in sorted({r.seed for r in rs})]
    for r in rs:
        r.warmup_ratio = 0.005
    fr.report(refs + rs, {"mlp": plan}, d)
    return d


def test_merge_joins_processes_that_split_the_held_out_seeds(tmp_path):
    """Two processes repeat the tuning seed and the pilot and each runs its own held-out seeds: the merge
    keeps one copy of the shared runs, all the seeds, and, with held_out_from, only the seeds from there on."""
    losses = {n: [1.0, 1.0, 1.0 + i / 100, 1.01 + i / 100, 0.99 + i / 100, 1.02 + i / 100, 1.0 + i / 100]
              for i, n in enumerate(fr.RULES)}
    everything = [r for s in (4, 16) for r in _runs(losses, scale=s)]
    plan = fr.seed_plan(everything, "mlp", minimum=2, cap=8)
    first = _write(tmp_path / "a", [r for r in everything if r.seed <= 3], plan)
    second = _write(tmp_path / "b", [r for r in everything if r.seed in (0, 1, 4, 5, 6)], plan)
    merged, plans = fr.load([first, second])
    merged = [r for r in merged if r.name != "reference"]
    assert sorted(fr._key(r) for r in merged) == sorted(fr._key(r) for r in everything)
    assert fr.scales_in(merged) == [4, 16]
    assert plans["mlp"]["n"] == 5 and "2 run(s) merged, held-out seeds 2-6" in plans["mlp"]["why"]
    assert fr.verdict_table(merged) == fr.verdict_table(everything)
    fresh, plans = fr.load([first, second], held_out_from=4)
    assert sorted({r.seed for r in fresh}) == [0, 1, 4, 5, 6] and plans["mlp"]["n"] == 3
    assert "from seed 4 on" in plans["mlp"]["why"]
    assert all(row["test"].n == 3 for row in fr.verdicts(fresh, "mlp", 16, "largebatch"))


def test_merge_refuses_runs_that_disagree(tmp_path):
    """The shared tuning seed must read the same in every process; a different machine or code does not."""
    losses = {n: [1.0, 1.0, 1.0, 1.01] for n in fr.RULES}
    rs = _runs(losses)
    plan = fr.seed_plan(rs, "mlp", minimum=2, cap=8)
    first = _write(tmp_path / "a", rs, plan)
    other = _runs({**losses, "largebatch": [1.001, 1.0, 1.0, 1.01]})
    second = _write(tmp_path / "b", other, plan)
    with pytest.raises(SystemExit, match=r"largebatch seed 0 reads 1\.001 where an earlier directory's identical run"):
        fr.load([first, second])


@settings(max_examples=25, deadline=None)
@given(owner=st.lists(st.integers(0, 3), min_size=5, max_size=5), cut=st.integers(2, 7),
       jitter=st.lists(st.floats(-0.02, 0.02), min_size=5 * len(fr.RULES), max_size=5 * len(fr.RULES)))
def test_any_split_of_the_held_out_seeds_merges_to_the_unsplit_run(tmp_path_factory, owner, cut, jitter):
    """However the held-out seeds 2-6 are shared out over up to four processes (each repeating seeds 0 and
    1), the merge gives the unsplit set and its verdicts; held_out_from keeps exactly the seeds from there on."""
    losses = {n: [1.0, 1.0] + [1.0 + jitter[i * 5 + k] for k in range(5)] for i, n in enumerate(fr.RULES)}
    everything = _runs(losses)
    plan = fr.seed_plan(everything, "mlp", minimum=2, cap=8)
    root = tmp_path_factory.mktemp("split")
    parts = [{0, 1} | {2 + k for k, o in enumerate(owner) if o == p} for p in sorted(set(owner))]
    # Each process's plan counts the held-out seeds it ran, as benchmark_task's does.
    dirs = [_write(root / str(i), [r for r in everything if r.seed in part], {**plan, "n": len(part) - 2})
            for i, part in enumerate(parts)]
    merged, plans = fr.load(dirs)
    assert sorted(fr._key(r) for r in merged if r.name != "reference") == sorted(fr._key(r) for r in everything)
    assert fr.verdict_table(merged) == fr.verdict_table(everything) and plans["mlp"]["n"] == 5
    later, plans = fr.load(dirs, held_out_from=cut)
    assert {r.seed for r in later} == {0, 1} | set(range(cut, 7)) and plans["mlp"]["n"] == 7 - cut
