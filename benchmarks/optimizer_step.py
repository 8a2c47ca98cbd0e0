"""Median optimizer-step time of LAMB and LANS against torch's AdamW and torch-optimizer's Lamb.

All optimizers update the same parameters, with fixed gradients, in one process; their steps are
interleaved (one step of each in turn, the order rotated every round) so that a busy or throttled
machine slows them all alike. Reported: the median step time, its ratio to ``AdamW(fused=True)``, and
the memory each optimizer keeps beyond the parameters and gradients (state plus persistent buffers).

Shapes: BERT-base (110M parameters in 199 tensors), ResNet-50 (25.6M in 161 tensors) and, on a GPU
only, GPT 1.3B (1.31B in 292 tensors; fewer optimizers side by side, to fit in memory).

On CUDA, ``LAMB``/``LANS`` are the defaults (the fused Triton kernels) and ``(fused=False)`` rows time
the foreach path. On CPU the defaults are the foreach path and ``(fused=True)`` rows time the fused
path's C kernels (compiled on first use; opt-in, as torch's ``AdamW(fused=True)`` is).

    python benchmarks/optimizer_step.py            # full run, a few minutes at most
    python benchmarks/optimizer_step.py --quick    # ResNet-50 shapes only, a few rounds (< 20 s)
    python benchmarks/optimizer_step.py --device cuda
    python benchmarks/optimizer_step.py --readme   # also print the README's table

torch-optimizer: ``pip install --no-deps torch-optimizer`` (its other dependencies are not needed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable

import torch

from largebatch.client.optim import LAMB, LANS
from largebatch.client.optim._fused import fused_available


def bert_base_shapes() -> list[tuple[int, ...]]:
    h, ff, vocab, positions = 768, 3072, 30522, 512
    shapes: list[tuple[int, ...]] = [(vocab, h), (positions, h), (2, h), (h,), (h,)]  # embeddings + LayerNorm
    for _ in range(12):
        shapes += [(h, h), (h,)] * 4  # q, k, v, attention output
        shapes += [(h,), (h,)]  # attention LayerNorm
        shapes += [(ff, h), (ff,), (h, ff), (h,)]  # feed-forward
        shapes += [(h,), (h,)]  # output LayerNorm
    shapes += [(h, h), (h,)]  # pooler
    return shapes


def gpt_1_3b_shapes() -> list[tuple[int, ...]]:
    """GPT-2-style decoder, d=2048, 24 layers, 2048 positions, vocabulary padded to 50304."""
    d, layers, vocab, positions = 2048, 24, 50304, 2048
    shapes: list[tuple[int, ...]] = [(vocab, d), (positions, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,)]  # LayerNorm, qkv, attention output
        shapes += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]  # LayerNorm, MLP
    shapes += [(d,), (d,)]  # final LayerNorm
    return shapes


def resnet50_shapes() -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(width * 4, width, 1, 1), (width * 4,), (width * 4,)]
            if b == 0:
                shapes += [(width * 4, in_ch, 1, 1), (width * 4,), (width * 4,)]
            in_ch = width * 4
    shapes += [(1000, 2048), (1000,)]
    return shapes


def torch_optimizer_lamb() -> type | None:
    """torch-optimizer's Lamb, without importing the package's other dependencies."""
    loaded = sys.modules.get("torch_optimizer.lamb")
    if loaded is not None:
        return loaded.Lamb
    try:
        from torch_optimizer import Lamb

        return Lamb
    except ImportError:
        pass
    spec = importlib.util.find_spec("torch_optimizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = types.ModuleType("torch_optimizer")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_optimizer"] = package
    from torch_optimizer.lamb import Lamb

    return Lamb


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                total += value.numel() * value.element_size()
    extra = getattr(opt, "extra_memory_bytes", None)
    return total + (extra() if extra else 0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(shapes: list[tuple[int, ...]], device: torch.device, rounds: int, with_single: bool,
          large: bool = False) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)  # (on the device: 1.3B CPU randoms take a minute)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, device=device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device) * 1e-3
    param_bytes = sum(p.numel() * p.element_size() for p in params)

    def groups() -> list[dict]:  # BERT-style: no weight decay for 1-D tensors (biases, norms)
        return [{"params": [p for p in params if p.dim() > 1]},
                {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]

    candidates: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "AdamW(fused=True)": lambda: torch.optim.AdamW(groups(), lr=1e-4, weight_decay=0.01, fused=True),
    }
    if not large:
        candidates["AdamW(foreach=True)"] = lambda: torch.optim.AdamW(groups(), lr=1e-4, weight_decay=0.01,
                                                                      foreach=True)
    candidates["LAMB"] = lambda: LAMB(groups(), lr=1e-4)
    candidates["LANS"] = lambda: LANS(groups(), lr=1e-4)
    if device.type == "cpu" and fused_available(device):  # the C kernels: opt-in on CPU, as torch's fused AdamW
        candidates["LAMB(fused=True)"] = lambda: LAMB(groups(), lr=1e-4, fused=True)
        candidates["LANS(fused=True)"] = lambda: LANS(groups(), lr=1e-4, fused=True)
    if device.type == "cuda":  # the defaults are the fused kernels there: time the foreach path too
        candidates["LAMB(fused=False)"] = lambda: LAMB(groups(), lr=1e-4, fused=False)
        if not large:
            candidates["LANS(fused=False)"] = lambda: LANS(groups(), lr=1e-4, fused=False)
    if with_single:
        candidates["LAMB(foreach=False)"] = lambda: LAMB(groups(), lr=1e-4, foreach=False)
    peer = torch_optimizer_lamb()
    if peer is not None and not large:
        candidates["torch-optimizer Lamb"] = lambda: peer(groups(), lr=1e-4, weight_decay=0.01)

    opts = {name: make() for name, make in candidates.items()}
    for opt in opts.values():  # state creation and first-touch page faults are not timed
        opt.step()
        opt.step()
    times: dict[str, list[float]] = {name: [] for name in opts}
    names = list(opts)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            sync(device)
            start = time.perf_counter()
            opts[name].step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["AdamW(fused=True)"])
    rows = []
    for name in names:
        med = statistics.median(times[name])
        rows.append({
            "optimizer": name,
            "median_ms": med * 1e3,
            "vs_fused_adamw": med / base,
            "extra_memory_x_params": state_bytes(opts[name]) / param_bytes,
        })
    lamb_ms = min(r["median_ms"] for r in rows if r["optimizer"].startswith("LAMB"))
    for row in rows:
        row["lamb_speedup"] = row["median_ms"] / lamb_ms
    return rows


def readme_table(results: dict[str, list[dict]]) -> str:
    """The README's table: one column per suite, ``median ms (ratio to fused AdamW)``."""
    suites = list(results)
    head = "| | " + " | ".join(suites) + " |"
    lines = [head, "|---" * (len(suites) + 1) + "|"]
    names: list[str] = []
    for rows in results.values():
        names += [r["optimizer"] for r in rows if r["optimizer"] not in names]
    for name in names:
        cells = []
        for suite in suites:
            row = next((r for r in results[suite] if r["optimizer"] == name), None)
            cells.append("-" if row is None else f"{row['median_ms']:.1f} ms ({row['vs_fused_adamw']:.2f}×)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    memory = []
    for suite in suites:
        by = {r["optimizer"]: r["extra_memory_x_params"] for r in results[suite]}
        memory.append(", ".join(f"{k} {by[k]:.2f}" for k in ("LAMB", "LANS") if k in by)
                      + f", AdamW {by['AdamW(fused=True)']:.2f}")
    lines.append("| extra memory (× params) | " + " | ".join(memory) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-50 shapes only, 5 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per optimizer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--single", action="store_true", help="also time LAMB's single-tensor loop")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--readme", action="store_true", help="also print the README's table")
    parser.add_argument("--suites", default=None,
                        help="comma-separated subset of BERT-base, ResNet-50, GPT-1.3B (GPU only)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    all_suites = {"BERT-base": bert_base_shapes, "ResNet-50": resnet50_shapes}
    if device.type == "cuda":  # 1.3B fp32 parameters: ~21 GB per optimizer with its state
        all_suites["GPT-1.3B"] = gpt_1_3b_shapes
    if args.suites:
        unknown = sorted(set(args.suites.split(",")) - set(all_suites))
        if unknown:
            parser.error(f"--suites: unknown or unavailable on {device.type}: {', '.join(unknown)}")
        chosen = args.suites.split(",")
    else:
        chosen = ["ResNet-50"] if args.quick else list(all_suites)
    suites = {name: all_suites[name]() for name in chosen}
    rounds = args.rounds or (5 if args.quick else 15)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    results = {}
    for suite, shapes in suites.items():
        n = sum(torch.Size(s).numel() for s in shapes)
        rows = bench(shapes, device, rounds, args.single, large=suite == "GPT-1.3B")
        results[suite] = rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"\n{suite}: {n / 1e6:.1f}M parameters in {len(shapes)} tensors, median of {rounds} interleaved steps")
        print("| optimizer | median step (ms) | vs AdamW fused | the fastest LAMB is faster by | extra memory (x params) |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['optimizer']} | {r['median_ms']:.1f} | {r['vs_fused_adamw']:.2f}x | "
                  f"{r['lamb_speedup']:.2f}x | {r['extra_memory_x_params']:.2f} |")
    if args.readme:
        print("\nREADME table:\n" + readme_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
