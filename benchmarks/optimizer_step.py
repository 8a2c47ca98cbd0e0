"""Median optimizer-step time of LAMB and LANS against torch's AdamW and torch-optimizer's Lamb.

All optimizers update the same parameters, with fixed gradients, in one process; their steps are
interleaved (one step of each in turn, the order rotated every round) so that a busy or throttled
machine slows them all alike. Reported: the median step time, its ratio to ``AdamW(fused=True)``, and
the memory each optimizer keeps beyond the parameters and gradients (state plus persistent buffers).

Shapes: BERT-base (110M parameters in 199 tensors) and ResNet-50 (25.6M in 161 tensors).

    python benchmarks/optimizer_step.py            # full run, a few minutes at most
    python benchmarks/optimizer_step.py --quick    # ResNet-50 shapes only, a few rounds (< 20 s)
    python benchmarks/optimizer_step.py --device cuda

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


def bench(shapes: list[tuple[int, ...]], device: torch.device, rounds: int, with_single: bool) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
    param_bytes = sum(p.numel() * p.element_size() for p in params)

    def groups() -> list[dict]:  # BERT-style: no weight decay for 1-D tensors (biases, norms)
        return [{"params": [p for p in params if p.dim() > 1]},
                {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]

    candidates: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "AdamW(fused=True)": lambda: torch.optim.AdamW(groups(), lr=1e-4, weight_decay=0.01, fused=True),
        "AdamW(foreach=True)": lambda: torch.optim.AdamW(groups(), lr=1e-4, weight_decay=0.01, foreach=True),
        "LAMB": lambda: LAMB(groups(), lr=1e-4),
        "LANS": lambda: LANS(groups(), lr=1e-4),
    }
    if with_single:
        candidates["LAMB(foreach=False)"] = lambda: LAMB(groups(), lr=1e-4, foreach=False)
    peer = torch_optimizer_lamb()
    if peer is not None:
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
    lamb_ms = next(r["median_ms"] for r in rows if r["optimizer"] == "LAMB")
    for row in rows:
        row["lamb_speedup"] = row["median_ms"] / lamb_ms
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-50 shapes only, 5 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per optimizer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--single", action="store_true", help="also time LAMB's single-tensor loop")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    suites = {"ResNet-50": resnet50_shapes()} if args.quick else {"BERT-base": bert_base_shapes(),
                                                                 "ResNet-50": resnet50_shapes()}
    rounds = args.rounds or (5 if args.quick else 15)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    results = {}
    for suite, shapes in suites.items():
        n = sum(torch.Size(s).numel() for s in shapes)
        rows = bench(shapes, device, rounds, args.single)
        results[suite] = rows
        print(f"\n{suite}: {n / 1e6:.1f}M parameters in {len(shapes)} tensors, median of {rounds} interleaved steps")
        print("| optimizer | median step (ms) | vs AdamW fused | LAMB is faster by | extra memory (x params) |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['optimizer']} | {r['median_ms']:.1f} | {r['vs_fused_adamw']:.2f}x | "
                  f"{r['lamb_speedup']:.2f}x | {r['extra_memory_x_params']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
