import contextlib
import io
import json
import subprocess
import sys

import pytest

from largebatch.scaling_rules import recommend
from largebatch.scaling_rules.cli import main, parse_count

from .test_paper_vectors import LANS_REQUEST


def _cli(args: list[str]) -> tuple[int, str]:
    """The command in this process, as the installed ``largebatch`` runs it: its exit status and
    what it wrote to stderr (an uncaught exception fails the test with its traceback)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


FLAGS = ["recommend", "--model-params", "340M", "--ref-batch", "512", "--ref-lr", "6.25e-4",
         "--ref-warmup", "0.003125", "--ref-steps", "1M", "--target-batch", "32K"]


def test_parse_count():
    assert parse_count("32K") == 32768 and parse_count("1M") == 1_000_000 and parse_count("512") == 512
    assert parse_count("340M") == 340_000_000 and parse_count("1.5B") == 1_500_000_000


def test_json_output_is_the_engine_recipe(capsys):
    assert main([*FLAGS, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = recommend({"model": {"params": 340_000_000}, "target": {"batch_size": 32768},
                          "reference": {"batch_size": 512, "lr": 6.25e-4, "warmup_ratio": 0.003125,
                                        "steps": 1_000_000}})
    assert out == json.loads(expected.model_dump_json())
    assert out["stages"][0]["peak_lr"] == 0.005 and out["total_steps"] == 15625


def test_v3_flags_are_the_request_fields(capsys):
    flags = ["recommend", "--model-params", "1B", "--width", "2048", "--ref-width", "512", "--ref-batch", "256",
             "--ref-seq-len", "2048", "--ref-lr", "1e-3", "--ref-optimizer", "adamw", "--ref-steps", "100000",
             "--ref-warmup", "0.01", "--ref-weight-decay", "0.1", "--target-batch", "1K", "--tokens", "5e10",
             "--decay", "wsd", "--weight-decay-rule", "timescale", "--json"]
    assert main(flags) == 0
    out = json.loads(capsys.readouterr().out)
    expected = recommend({"model": {"params": 10**9, "width": 2048},
                          "reference": {"batch_size": 256, "seq_len": 2048, "lr": 1e-3, "optimizer": "adamw",
                                        "steps": 100_000, "warmup_ratio": 0.01, "weight_decay": 0.1,
                                        "model_width": 512},
                          "target": {"batch_size": 1024, "tokens": 5e10}, "decay": "wsd",
                          "weight_decay_rule": "timescale"})
    assert out == json.loads(expected.model_dump_json())
    assert out["stages"][0]["decay"] == "wsd" and out["optimizer"]["weight_decay"] != 0.1


def test_table_output(capsys):
    assert main(FLAGS) == 0
    out = capsys.readouterr().out
    assert "lamb" in out and "15,625" in out and "why:" in out


def test_request_file_and_plot(tmp_path, capsys):
    req = tmp_path / "req.json"
    req.write_text(json.dumps(LANS_REQUEST))
    png = tmp_path / "lr.png"
    assert main(["recommend", "--request", str(req), "--plot", str(png), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_steps"] == 4301
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    svg = tmp_path / "lr.svg"
    assert main(["recommend", "--request", str(req), "--plot", str(svg)]) == 0
    assert b"<svg" in svg.read_bytes()[:500]


@pytest.mark.parametrize(("args", "needle"), [
    (["recommend", "--model-params", "340M", "--ref-batch", "0", "--ref-lr", "1e-3", "--ref-steps", "1000",
      "--target-batch", "4K"], "--ref-batch: must be a positive count"),
    (["recommend", "--model-params", "340M", "--ref-batch", "512", "--ref-lr", "nan", "--ref-steps", "1000",
      "--target-batch", "4K"], "reference.lr"),
    (["recommend", "--model-params", "340M", "--ref-batch", "512", "--ref-lr", "1e-3", "--ref-steps", "1000",
      "--target-batch", "4.5"], "--target-batch"),
    (["recommend", "--model-params", "340M"], "missing --ref-batch"),
    (["recommend", "--request", "/nonexistent.json"], "cannot read"),
])
def test_cli_errors_are_one_line_without_traceback(args, needle):
    code, err = _cli(args)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err


def test_run_as_a_module_an_error_is_one_line_without_traceback():
    # `python -m` makes the module __main__, with classes of its own: it must still print one line.
    proc = subprocess.run([sys.executable, "-m", "largebatch.scaling_rules.cli", *FLAGS[:-1], "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "largebatch recommend: error: argument --target-batch: must be a positive count, got '0'"


def test_bare_command_prints_usage():
    code, err = _cli([])
    assert code == 2 and "usage: largebatch" in err and "recommend" in err


def test_help_shows_defaults_and_suffixes(capsys):
    with pytest.raises(SystemExit):
        main(["recommend", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: same-epochs" in text and "K is 1024 for batches" in text
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("value", ["-5", "-1K", "-0.5"])
def test_negative_counts_get_one_message(value):
    code, err = _cli([*FLAGS[:-1], value])
    assert code == 2 and "--target-batch: must be a positive count" in err, err


def test_plot_format_follows_the_suffix(tmp_path, capsys):
    pdf = tmp_path / "lr.pdf"
    assert main([*FLAGS, "--plot", str(pdf)]) == 0
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert f"plot written to {pdf}" in capsys.readouterr().err
    assert main([*FLAGS, "--plot", str(tmp_path / "lr.jpg")]) == 2
    assert "suffix must be .png, .svg or .pdf" in capsys.readouterr().err


def test_down_scaling_and_one_step_recipes_warn(capsys):
    down = recommend({"model": {"params": 10**8}, "reference": {"batch_size": 512, "lr": 1e-3, "steps": 1000},
                      "target": {"batch_size": 128}})
    assert any("scales down" in w for w in down.warnings)
    short = recommend({"model": {"params": 10**8}, "reference": {"batch_size": 512, "lr": 1e-3, "steps": 1000},
                       "target": {"batch_size": 1024, "steps": 1}})
    assert any("only 1 step" in w for w in short.warnings)


def test_max_overhead_flag_is_the_request_field(capsys):
    flags = ["recommend", "--model-params", "340M", "--ref-batch", "256", "--ref-lr", "1e-3", "--ref-optimizer",
             "adamw", "--ref-steps", "100000", "--noise-scale", "4000", "--target-batch", "auto"]
    assert main([*flags, "--max-overhead", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"][0]["batch_size"] == 2000
    assert main([*flags, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"][0]["batch_size"] == 800  # the default, 0.2
    code, err = _cli([*flags, "--max-overhead", "-1"])
    assert code == 2 and "target.max_overhead" in err
