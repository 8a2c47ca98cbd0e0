"""Median optimizer-step time of LAMB and LANS against torch's AdamW, timm's and torch-optimizer's Lamb.

All optimizers update the same parameters, with fixed gradients, in one process; their steps are
interleaved (one step of each in turn, the order rotated every round) so that a busy or throttled
machine slows them all alike. Reported: the median step time, its ratio to ``AdamW(fused=True)``, how
many times faster than timm's Lamb it is, and the memory each optimizer keeps beyond the parameters
and gradients (state plus persistent buffers). The load average is printed before and after.

Shapes: BERT-base (110M parameters in 199 tensors), ResNet-50 (25.6M in 161 tensors) and, on a GPU
only, GPT 1.3B (1.31B in 292 tensors; fewer optimizers side by side, to fit in memory).

``LAMB``/``LANS`` rows are the defaults (``fused=None``: the fused kernels, Triton on CUDA, C on CPU
where a compiler is found); ``(fused=False)`` rows time the foreach path, the fallback. timm's Lamb
runs with ``max_grad_norm=None`` (the math of the default LAMB: no clipping; its default clips).

    python benchmarks/optimizer_step.py            # full run, a few minutes at most
    python benchmarks/optimizer_step.py --quick    # ResNet-50 shapes only, a few rounds (< 20 s)
    python benchmarks/optimizer_step.py --suites BERT-base --threads 1,2 --readme   # the CPU goal
    python benchmarks/optimizer_step.py --suites BERT-base --threads 1,2 --breakdown   # + kept updates off, prologue
    python benchmarks/optimizer_step.py --device cuda
    python benchmarks/optimizer_step.py --readme   # also print the README's table

The peers: ``pip install --no-deps timm torch-optimizer`` (only their optimizer modules are loaded,
none of their other dependencies); a peer that is not installed is left out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable

import torch

from largebatch.client.optim import LAMB, LANS

TIMM = "timm Lamb"
CLIPPED = "AdamW(fused=True) + clip_grad_norm_"
# The CPU goal of the default LAMB and LANS: at most this many times fused AdamW's step, and at least
# this many times faster than timm's Lamb.
GOAL_VS_ADAMW, GOAL_VS_TIMM = 1.5, 4.0


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


def _peer_module(name: str) -> types.ModuleType | None:
    """The module ``name`` (``pkg.sub.mod``) without running its packages' ``__init__`` (and importing
    their other dependencies): bare package objects stand in for them. None where it is not installed."""
    if name in sys.modules:
        return sys.modules[name]
    parts = name.split(".")
    spec = importlib.util.find_spec(parts[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = list(spec.submodule_search_locations)
    for depth in range(1, len(parts)):
        package = ".".join(parts[:depth])
        if package not in sys.modules:
            stub = types.ModuleType(package)
            stub.__path__ = path
            sys.modules[package] = stub
        path = [os.path.join(path[0], parts[depth])]
    return importlib.import_module(name)


def torch_optimizer_lamb() -> type | None:
    """torch-optimizer's Lamb."""
    module = _peer_module("torch_optimizer.lamb")
    return None if module is None else module.Lamb


def timm_lamb() -> type | None:
    """timm's Lamb (``timm.optim.lamb`` needs only torch)."""
    module = _peer_module("timm.optim.lamb")
    return None if module is None else module.Lamb


class ClippedAdamW(torch.optim.AdamW):
    """Fused AdamW after ``clip_grad_norm_`` (foreach), the step the HF Trainer takes by default
    (``max_grad_norm=1.0``): like LAMB's prologue, a pass over every gradient before the update. The
    bound is out of reach here, so the gradients keep their values (the clip still scales them by 1)."""

    def step(self, closure=None):  # type: ignore[override]
        grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(grads, max_norm=1e30, foreach=True)
        return super().step(closure)


class NotKept:
    """The default LAMB or LANS with the CPU kernels' kept updates turned off, so pass 2 recomputes the
    update (``--breakdown``: what keeping it saves, timed beside it)."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt, self.state = opt, opt.state
        self.extra_memory_bytes = getattr(opt, "extra_memory_bytes", None)

    def step(self) -> None:
        from largebatch.client.optim import _cpu_fused

        keep, _cpu_fused._KEEP = _cpu_fused._KEEP, 0
        try:
            self.opt.step()
        finally:
            _cpu_fused._KEEP = keep


class Prologue(torch.optim.Optimizer):
    """The C kernels' per-tensor gradient norms alone: the pass the default LAMB and LANS make over every
    gradient before writing any state (``--breakdown``)."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):  # type: ignore[override]
        from largebatch.client.optim import _cpu_fused

        _cpu_fused.sumsq([p.grad for group in self.param_groups for p in group["params"]])


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
          large: bool = False, threads: list[int] | None = None, breakdown: bool = False) -> dict[int, list[dict]]:
    """Rows per thread count: the thread counts are interleaved too, each round runs every optimizer
    at each of them."""
    threads = threads or [torch.get_num_threads()]
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
    candidates[CLIPPED] = lambda: ClippedAdamW(groups(), lr=1e-4, weight_decay=0.01, fused=True)
    if not large:
        candidates["AdamW(foreach=True)"] = lambda: torch.optim.AdamW(groups(), lr=1e-4, weight_decay=0.01,
                                                                      foreach=True)
    candidates["LAMB"] = lambda: LAMB(groups(), lr=1e-4)
    candidates["LANS"] = lambda: LANS(groups(), lr=1e-4)
    candidates["LAMB(fused=False)"] = lambda: LAMB(groups(), lr=1e-4, fused=False)
    if not large:
        candidates["LANS(fused=False)"] = lambda: LANS(groups(), lr=1e-4, fused=False)
    if breakdown and device.type == "cpu":
        candidates["LAMB, updates not kept"] = lambda: NotKept(LAMB(groups(), lr=1e-4))
        candidates["LANS, updates not kept"] = lambda: NotKept(LANS(groups(), lr=1e-4))
        candidates["gradient-norm prologue alone"] = lambda: Prologue(groups())
    if with_single:
        candidates["LAMB(foreach=False)"] = lambda: LAMB(groups(), lr=1e-4, foreach=False)
    timm = timm_lamb()
    if timm is not None and not large:
        candidates[TIMM] = lambda: timm(groups(), lr=1e-4, weight_decay=0.01, max_grad_norm=None)
    peer = torch_optimizer_lamb()
    if peer is not None and not large:
        candidates["torch-optimizer Lamb"] = lambda: peer(groups(), lr=1e-4, weight_decay=0.01)

    opts = {name: make() for name, make in candidates.items()}
    for opt in opts.values():  # state creation and first-touch page faults are not timed
        opt.step()
        opt.step()
    times: dict[tuple[str, int], list[float]] = {(name, n): [] for name in opts for n in threads}
    names = list(opts)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in threads:
            torch.set_num_threads(n)
            for name in order:
                sync(device)
                start = time.perf_counter()
                opts[name].step()
                sync(device)
                times[name, n].append(time.perf_counter() - start)
    out = {}
    for n in threads:
        base = statistics.median(times["AdamW(fused=True)", n])
        clipped = statistics.median(times[CLIPPED, n])
        timm_ms = statistics.median(times[TIMM, n]) if TIMM in opts else None
        out[n] = [{
            "optimizer": name,
            "median_ms": statistics.median(times[name, n]) * 1e3,
            "vs_fused_adamw": statistics.median(times[name, n]) / base,
            "vs_clipped_adamw": statistics.median(times[name, n]) / clipped,
            "timm_lamb_over_this": None if timm_ms is None else timm_ms / statistics.median(times[name, n]),
            "extra_memory_x_params": state_bytes(opts[name]) / param_bytes,
        } for name in names]
    return out


def goal_lines(column: str, rows: list[dict]) -> list[str]:
    """Whether the default LAMB and LANS meet the CPU goal in one column of results."""
    by = {r["optimizer"]: r for r in rows}
    lines = []
    for name in ("LAMB", "LANS"):
        row = by.get(name)
        if row is None or row["timm_lamb_over_this"] is None:
            continue
        met = row["vs_fused_adamw"] <= GOAL_VS_ADAMW and row["timm_lamb_over_this"] >= GOAL_VS_TIMM
        lines.append(f"{column}: {name} {row['vs_fused_adamw']:.2f}x fused AdamW (goal <= {GOAL_VS_ADAMW}), "
                     f"{row['timm_lamb_over_this']:.1f}x faster than timm's Lamb (goal >= {GOAL_VS_TIMM}): "
                     f"{'met' if met else 'NOT met'}; {row['vs_clipped_adamw']:.2f}x fused AdamW after "
                     "clip_grad_norm_ (the HF Trainer's default step)")
    return lines


def readme_table(results: dict[str, list[dict]]) -> str:
    """The README's table: one column per suite (and thread count), ``median ms (ratio to fused AdamW)``,
    then how many times faster than timm's Lamb each default is, and the extra memory."""
    columns = list(results)
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    names: list[str] = []
    for rows in results.values():
        names += [r["optimizer"] for r in rows if r["optimizer"] not in names]
    for name in names:
        cells = []
        for column in columns:
            row = next((r for r in results[column] if r["optimizer"] == name), None)
            cells.append("-" if row is None else f"{row['median_ms']:.1f} ms ({row['vs_fused_adamw']:.2f}×)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    speedups, memory = [], []
    for column in columns:
        by = {r["optimizer"]: r for r in results[column]}
        speedups.append(", ".join(f"{k} {by[k]['timm_lamb_over_this']:.1f}×" for k in ("LAMB", "LANS")
                                  if k in by and by[k]["timm_lamb_over_this"] is not None) or "-")
        memory.append(", ".join(f"{k} {by[k]['extra_memory_x_params']:.2f}" for k in ("LAMB", "LANS") if k in by)
                      + f", AdamW {by['AdamW(fused=True)']['extra_memory_x_params']:.2f}")
    lines.append("| faster than timm's Lamb | " + " | ".join(speedups) + " |")
    lines.append("| extra memory (× params) | " + " | ".join(memory) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-50 shapes only, 5 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per optimizer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", default=None,
                        help="torch intra-op threads, or a comma-separated list timed interleaved (1,2)")
    parser.add_argument("--single", action="store_true", help="also time LAMB's single-tensor loop")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--readme", action="store_true", help="also print the README's table")
    parser.add_argument("--breakdown", action="store_true",
                        help="CPU: also LAMB and LANS with the kept updates off, and the gradient-norm prologue alone")
    parser.add_argument("--suites", default=None,
                        help="comma-separated subset of BERT-base, ResNet-50, GPT-1.3B (GPU only)")
    args = parser.parse_args(argv)
    threads = [int(n) for n in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
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
    print(f"torch {torch.__version__}, {device}, threads {threads}, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1, 5 min)")
    results: dict[str, list[dict]] = {}
    goals: list[str] = []
    for suite, shapes in suites.items():
        n = sum(torch.Size(s).numel() for s in shapes)
        per_threads = bench(shapes, device, rounds, args.single, large=suite == "GPT-1.3B", threads=threads,
                            breakdown=args.breakdown)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for count, rows in per_threads.items():
            column = suite if len(threads) == 1 else f"{suite}, {count} thread{'s' * (count > 1)}"
            results[column] = rows
            goals += goal_lines(column, rows) if device.type == "cpu" else []
            print(f"\n{column}: {n / 1e6:.1f}M parameters in {len(shapes)} tensors, median of {rounds} "
                  "interleaved steps")
            print("| optimizer | median step (ms) | vs AdamW fused | timm's Lamb is slower by | extra memory (x params) |")
            print("|---|---:|---:|---:|---:|")
            for r in rows:
                timm = "-" if r["timm_lamb_over_this"] is None else f"{r['timm_lamb_over_this']:.2f}x"
                print(f"| {r['optimizer']} | {r['median_ms']:.1f} | {r['vs_fused_adamw']:.2f}x | {timm} | "
                      f"{r['extra_memory_x_params']:.2f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1, 5 min)")
    for line in goals:
        print(line)
    if args.readme:
        print("\nREADME table:\n" + readme_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
