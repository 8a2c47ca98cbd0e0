"""benchmarks/pg_scale.py keeps working on PostgreSQL (a tiny run; its figures are never asserted) and
leaves no schema behind."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.postgres
def test_pg_scale_tiny_run_cleans_up():
    psycopg = pytest.importorskip("psycopg")
    try:
        conn = psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True, connect_timeout=3)
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 unavailable: {e}")
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "pg_scale.py"), "--runs", "16", "--small", "8",
                             "--requests", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "loaded: {" in out and "'big': 16" in out
    assert "EXPLAIN ANALYZE of the evidence read" in out and "16 runs / 8 runs:" in out
    with conn:
        schema = f"lb_pgscale_{proc.pid}"  # the benchmark's schema is named after its process
        left = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()[0]
    assert left == 0
