"""`largebatch runs list|show` and `largebatch studies list|show` against a real service."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest

from largebatch.client import Client
from largebatch.scaling_rules.cli import build_parser, main

pytestmark = pytest.mark.slow  # against a `largebatch serve` subprocess (conftest.py)

REQUEST = {"model": {"params": 110_000_000}, "target": {"batch_size": 4096},
           "reference": {"batch_size": 256, "lr": 1e-4, "steps": 100_000, "warmup_ratio": 0.01}}


@pytest.fixture(scope="module")
def runs(service):
    with Client(service.url) as c:
        c.create_study("cli-study", model_params=110_000_000)
        opened = [c.recommend(REQUEST, study="cli-study", start_run=True).run for _ in range(3)]
        c.report_batch(opened[0].id, [(0, 9.5), (1, 9.25)])
        c.complete_run(opened[0].id, metric=1.75)
        c.complete_run(opened[1].id, outcome="failed", reason="node lost")
    return opened


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_runs_list_is_a_table(service, runs, capsys):
    code, out, _ = run_cli(capsys, "runs", "list", "cli-study", "--url", service.url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["id", "#", "state", "batch"]
    body = lines[2:-1]
    assert [line.split()[2] for line in body] == ["completed", "failed", "running"]
    assert body[0].split()[0] == str(runs[0].id) and "1.75" in body[0] and "9.25" in body[0]
    assert lines[-1] == "1-3 of 3 runs"


def test_runs_list_filters_pages_and_formats(service, runs, capsys):
    code, out, _ = run_cli(capsys, "runs", "list", "cli-study", "--state", "running", "--url", service.url)
    assert code == 0 and out.splitlines()[-1] == "1-1 of 1 run" and "running" in out
    code, out, _ = run_cli(capsys, "runs", "list", "cli-study", "--limit", "2", "--url", service.url)
    assert out.splitlines()[-1] == "1-2 of 3 runs (--offset 2 for more)"
    code, out, _ = run_cli(capsys, "runs", "list", "cli-study", "--json", "--url", service.url)
    page = json.loads(out)
    assert page["total"] == 3 and [r["id"] for r in page["items"]] == [r.id for r in runs]
    code, out, _ = run_cli(capsys, "runs", "list", "cli-study", "--csv", "--url", service.url)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["state"] for r in rows] == ["completed", "failed", "running"]


def test_runs_show(service, runs, capsys):
    code, out, _ = run_cli(capsys, "runs", "show", str(runs[1].id), "--url", service.url)
    assert code == 0
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.split("\n\n")[0].splitlines())
    assert fields["state"] == "failed" and fields["reason"] == "node lost"
    assert "total steps 6,250" in out and "peak LR" in out  # the recipe, as `largebatch recommend` prints it
    code, out, _ = run_cli(capsys, "runs", "show", str(runs[0].id), "--json", "--url", service.url)
    assert json.loads(out)["metric"] == 1.75


def test_studies_list_and_show(service, runs, capsys, monkeypatch):
    monkeypatch.setenv("LARGEBATCH_URL", service.url)  # the default for --url
    code, out, _ = run_cli(capsys, "studies", "list")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("cli-study "))
    assert row.split()[1:4] == ["transformer", "110,000,000", "eval_loss"] and row.split()[5] == "3"
    code, out, _ = run_cli(capsys, "studies", "show", "cli-study")
    assert "110,000,000 parameters" in out and re.search(r"^runs\s+3$", out, re.M)
    code, out, _ = run_cli(capsys, "studies", "list", "--json")
    assert "cli-study" in [s["name"] for s in json.loads(out)["items"]]


def test_errors_are_one_line_and_exit_2(service, capsys):
    code, _, err = run_cli(capsys, "runs", "show", "999999", "--url", service.url)
    assert code == 2 and err.strip() == "largebatch: error: not_found: run 999999 not found"
    code, _, err = run_cli(capsys, "runs", "list", "no-such-study", "--url", service.url)
    assert code == 2 and "not_found" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "runs", "list", "x", "--url", "http://127.0.0.1:9", "--timeout", "2")
    assert err.startswith("largebatch: error: cannot reach http://127.0.0.1:9 after 3 tries (GET /v1/studies/x/runs")
    assert code == 2 and "is `largebatch serve` running there?" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "studies", "list", "--url", "not a url")
    assert code == 2 and "--url" in err
    with pytest.raises(SystemExit):
        main(["runs", "list", "s", "--limit", "0"])
    assert "must be a positive count, got '0'" in capsys.readouterr().err


def test_studies_create_and_delete(service, capsys, monkeypatch):
    code, out, _ = run_cli(capsys, "studies", "create", "cli-made", "--model-params", "25.6M", "--family", "cnn",
                           "--metric", "top1", "--direction", "maximize", "--url", service.url)
    assert code == 0 and "created study cli-made (cnn, 25,600,000 parameters; top1, maximize)" in out
    with Client(service.url) as c:
        assert c.get_study("cli-made").model_family == "cnn"
    code, _, err = run_cli(capsys, "studies", "create", "cli-made", "--model-params", "1M", "--url", service.url)
    assert code == 2 and "already" in err.lower()
    # Without --yes and without a terminal to ask on, nothing is deleted.
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, _, err = run_cli(capsys, "studies", "delete", "cli-made", "--url", service.url)
    assert code == 2 and "without --yes" in err
    code, out, _ = run_cli(capsys, "studies", "delete", "cli-made", "--yes", "--url", service.url)
    assert code == 0 and "deleted study cli-made" in out
    code, _, err = run_cli(capsys, "studies", "show", "cli-made", "--url", service.url)
    assert code == 2 and "not_found" in err


def _refusal(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1, err
    return err.split(": error: argument ", 1)[1].split(": ", 1)[1]


@pytest.mark.parametrize("value", ["-5", "abc", "1.5", "-1K"])
def test_a_bad_batch_size_reads_the_same_in_every_subcommand(value, capsys):
    recommend = ["recommend", "--model-params", "340M", "--ref-batch", "512", "--ref-lr", "1e-3", "--ref-steps", "1M"]
    assert _refusal(capsys, "runs", "list", "s", f"--batch-size={value}") == \
        _refusal(capsys, *recommend, f"--target-batch={value}")


def test_batch_sizes_and_run_ids_as_typed(capsys):
    assert build_parser().parse_args(["runs", "list", "s", "--batch-size", "32K"]).batch_size == 32768
    assert _refusal(capsys, "runs", "list", "s", "--batch-size", "0") == "must be a positive count, got '0'"
    assert _refusal(capsys, "runs", "show", "x1") == "not a run id: 'x1' (the id column of `largebatch runs list`)"
    assert _refusal(capsys, "runs", "list", "s", "--offset", "-1") == "must be 0 or more, got '-1'"


@pytest.mark.parametrize("command", [["runs", "list"], ["runs", "show"], ["studies", "list"], ["studies", "show"],
                                     ["studies", "create"], ["studies", "delete"]])
def test_help_states_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert not re.search(r"\(default[^)]*\) \(default", text), text
