"""benchmarks/service_load.py keeps working (a tiny bounded run; its figures are never asserted)."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_service_load_tiny_run(tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "service_load.py"), "--clients", "4",
                           "--seconds", "1", "--rounds", "1", "--warmup", "0.2", "--in-process-rounds", "2",
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["scenario"]: r for r in json.loads(out.read_text())["results"]}
    assert {"ceiling", "recommend", "lifecycle", "healthz", "recommend-study"} <= set(rows)
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in rows.values())
    assert "of the ceiling's throughput" in proc.stdout and "middleware stack:" in proc.stdout
