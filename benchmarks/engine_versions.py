"""The engine's latency against an earlier version of itself, side by side on the same machine.

    python benchmarks/engine_versions.py                 # this checkout vs engine v2 (240fcbe), 6 rounds
    python benchmarks/engine_versions.py --peer COMMIT   # vs any commit of this repository
    python benchmarks/engine_versions.py --quick         # 2 rounds of 500 calls
    python benchmarks/engine_versions.py --readme        # also print the README table

An absolute latency says as much about the machine as about the engine (the same engine v2 took 23 us
on one development machine and 116 us on another), so the engine is timed beside a peer: the peer
commit's `scaling_rules` is exported with `git archive` into a temporary directory and both run in
fresh interpreters, in alternating rounds, on the same requests (dicts, validation included, as
`benchmarks/service_load.py`'s engine_latency). Each round's figure is the median of its calls; the
table gives the best round of each (the least disturbed by the rest of the machine) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
V2 = "240fcbe"  # engine v2 as it landed (stop 19)

REQUESTS = {
    "BERT 512 -> 32K": {"model": {"params": 340000000},
                        "reference": {"batch_size": 512, "lr": 0.000625, "warmup_ratio": 0.003125, "steps": 1000000},
                        "target": {"batch_size": 32768}},
    "GPT-3 tokens, 175B": {"model": {"params": 175_000_000_000, "family": "transformer"},
                           "reference": {"batch_size": 256, "seq_len": 2048, "lr": 6e-4, "optimizer": "adamw",
                                         "betas": [0.9, 0.95], "model_params": 125_000_000, "steps": 600000},
                           "target": {"batch_size": 1536, "seq_len": 2048}},
}

# What one round runs in a fresh interpreter: its own import of the engine, a warm-up, then the calls.
ROUND = """
import json, sys, time
from largebatch.scaling_rules.engine import recommend
requests, calls = json.loads(sys.argv[1]), int(sys.argv[2])
out = {}
for name, req in requests.items():
    recommend(req)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        recommend(req)
        times.append(time.perf_counter() - t0)
    times.sort()
    out[name] = times[len(times) // 2] * 1e6
print(json.dumps({"file": recommend.__code__.co_filename, "p50_us": out}))
"""


def export(commit: str, where: Path) -> Path:
    """The peer's package as ``where/largebatch`` (its top-level folders are the package)."""
    pkg = where / "largebatch"
    pkg.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "scaling_rules"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(pkg)], input=archive, check=True)
    (pkg / "__init__.py").write_text("")
    return where


def one_round(path: Path | None, calls: int) -> dict:
    env = dict(os.environ)
    if path is not None:  # ahead of the installed checkout on sys.path
        env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", ROUND, json.dumps(REQUESTS), str(calls)], env=env, cwd=tempfile.gettempdir(),
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"a round failed ({path or 'this checkout'}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", default=V2, help=f"the commit to compare with (default {V2}, engine v2)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--readme", action="store_true")
    args = ap.parse_args()
    rounds, calls = (2, 500) if args.quick else (args.rounds, args.calls)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "this checkout"
    best: dict[str, dict[str, float]] = {"this": {}, "peer": {}}
    with tempfile.TemporaryDirectory() as tmp:
        peer_path = export(args.peer, Path(tmp))
        for _ in range(rounds):
            for side, path in (("peer", peer_path), ("this", None)):
                got = one_round(path, calls)
                expect_peer = got["file"].startswith(str(peer_path))
                if expect_peer != (side == "peer"):
                    raise SystemExit(f"the {side} round imported the engine from {got['file']}")
                for name, us in got["p50_us"].items():
                    best[side][name] = min(best[side].get(name, float("inf")), us)
    rows = [f"| request | {args.peer} (peer) | {head} (this checkout) | ratio |", "|---|---:|---:|---:|"]
    for name in REQUESTS:
        p, t = best["peer"][name], best["this"][name]
        rows.append(f"| {name} | {p:.1f} us | {t:.1f} us | {t / p:.2f}x |")
    print(f"engine latency, p50 of {calls} calls, best of {rounds} alternating rounds, in fresh interpreters:")
    print("\n".join(rows))
    if args.readme:
        print("\nREADME table:\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
