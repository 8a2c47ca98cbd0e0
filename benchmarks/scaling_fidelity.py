"""Does the largebatch recipe keep accuracy at large batch better than the rules people use?

Real training on this CPU (issue #7). Two tasks:

* ``lm``: a small causal transformer language model on bytes of Python's own standard library
  sources (text that ships with every Python);
* ``mlp``: an MLP classifier on data labelled by a fixed random "teacher" network (generated, so
  the task has a known, learnable structure).

For each task: a reference at batch B0 with its LR tuned by a sweep (LAMB, and AdamW for the AdamW
peers); then at 4x, 16x and 64x B0 with the same number of examples (so 64x still takes >= 200
steps in the full run), these recipes:

* ``largebatch``: the engine's recipe from the reference, empty store;
* ``largebatch+evidence``: the engine's recipe once its own earlier runs (the B0 sweep, and the
  small sweeps it ran at the smaller multiples) are logged as evidence;
* ``adamw-linear``, ``adamw-sqrt``: AdamW with the tuned AdamW reference LR scaled linearly / by sqrt,
  the reference warmup ratio;
* ``lamb-sqrt``: LAMB with sqrt scaling and an unscaled warmup (the reference's warmup ratio).

and, at each target batch, an **oracle**: the best of a grid sweep of LAMB over LR x warmup ratio
at that batch with the same examples (and of every recipe above, which are configurations at that
batch too). Reports, per run, the regret vs the oracle (the autoscaler's own error: the LR and
warmup it picked vs the best ones) and the gap to the small-batch reference (the task's critical
batch: what no LR fixes); per scale, the examples ratio that the gradient noise scale predicts,
``(1 + B/B_noise) / (1 + B0/B_noise)`` (McCandlish et al. 2018), with B_noise measured by the client's
estimator during the first large-batch run (4x, micro-batches of B0). The LAMB runs at smaller scales (grid included) are the study's
evidence for ``largebatch+evidence`` at the larger ones. Also writes a PNG of loss curves and LR schedules.
``--seeds N`` runs every rule, and the recipe of seed 0's oracle, again at seeds 1..N-1 (other
initialisations and data orders) and adds a table of largebatch's loss over each, paired by seed:
which of the regrets are larger than what a seed moves.
Usage: ``python benchmarks/scaling_fidelity.py [--quick] [--seeds N] [--out DIR] [--tasks lm,mlp]``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sysconfig
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from largebatch.client.optim import GradientNoiseScale, build
from largebatch.scaling_rules import OptimizerConfig, Recipe, Stage, lr_at, recommend
from largebatch.scaling_rules.learning import RunEvidence, explore_lrs

SCALES = (4, 16, 64)
DIVERGENCE_FACTOR = 3.0  # a loss 3x above the initial loss (or NaN) ends the run as diverged


# ---------------------------------------------------------------- tasks


class TinyLM(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, seq: int):
        super().__init__()
        self.emb = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos[: x.shape[1]]
        return self.head(self.norm(self.blocks(h, mask=self.mask, is_causal=True)))


@dataclass
class Task:
    name: str
    b0: int
    examples: int
    make_model: object
    train_x: torch.Tensor
    train_y: torch.Tensor | None
    val_x: torch.Tensor
    val_y: torch.Tensor | None
    seq: int = 0
    params: int = 0
    sweep: tuple[float, ...] = ()
    adamw_sweep: tuple[float, ...] = ()

    def batch(self, gen: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.name == "lm":
            starts = torch.randint(0, len(self.train_x) - self.seq - 1, (size,), generator=gen)
            rows = self.train_x[starts[:, None] + torch.arange(self.seq + 1)]
            return rows[:, :-1], rows[:, 1:]
        idx = torch.randint(0, len(self.train_x), (size,), generator=gen)
        return self.train_x[idx], self.train_y[idx]  # type: ignore[index]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(x)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def val_loss(self, model: nn.Module) -> float:
        if self.name == "lm":
            rows = self.val_x
            return float(self.loss(model, rows[:, :-1], rows[:, 1:]))
        return float(self.loss(model, self.val_x, self.val_y))  # type: ignore[arg-type]


def lm_task(quick: bool) -> Task:
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    data = b"".join(p.read_bytes() for p in sorted(stdlib.glob("*.py")))
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    split = int(len(tokens) * 0.95)
    seq = 16 if quick else 32
    val = tokens[split:]
    n_val = 256
    starts = torch.linspace(0, len(val) - seq - 2, n_val).long()
    val_rows = val[starts[:, None] + torch.arange(seq + 1)]
    d, layers = (32, 1) if quick else (48, 2)
    b0 = 2 if quick else 4
    steps_64x = 40 if quick else 200
    return Task("lm", b0=b0, examples=64 * b0 * steps_64x, seq=seq,
                make_model=lambda: TinyLM(d, layers, 4, seq), train_x=tokens[:split], train_y=None,
                val_x=val_rows, val_y=None, sweep=(2e-3, 5e-3, 1.25e-2), adamw_sweep=(5e-4, 1.5e-3, 4.5e-3))


def mlp_task(quick: bool) -> Task:
    gen = torch.Generator().manual_seed(1234)
    dim, classes, n = 32, 10, 60_000
    teacher = nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, classes))
    for p in teacher.parameters():
        nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[-1]) * 2.0, generator=gen)
    x = torch.randn(n, dim, generator=gen)
    with torch.no_grad():
        logits = teacher(x) * 2.0
    # noisy labels (the val loss has a floor), drawn from the task's own generator: the same data in
    # every process, whatever ran before
    y = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen).squeeze(1)
    hidden = 64 if quick else 128
    b0 = 4 if quick else 8
    steps_64x = 40 if quick else 200

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(),
                             nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, classes))

    return Task("mlp", b0=b0, examples=64 * b0 * steps_64x, make_model=make, train_x=x[:50_000],
                train_y=y[:50_000], val_x=x[50_000:], val_y=y[50_000:], sweep=(2e-3, 6e-3, 1.8e-2),
                adamw_sweep=(3e-4, 1e-3, 3e-3))


# ---------------------------------------------------------------- training


@dataclass
class Result:
    task: str
    scale: int
    name: str
    batch: int
    lr: float
    steps: int
    val_loss: float
    diverged: bool
    seconds: float
    curve: list[tuple[int, float]] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    warmup_ratio: float | None = None
    b_noise: float | None = None  # measured during this run (the first largebatch run only)
    seed: int = 0  # the model's initialisation and the data order; the main tables are seed 0's


def manual_recipe(name: str, lr: float, batch: int, steps: int, warmup_ratio: float) -> Recipe:
    """A peer rule expressed as a recipe, so every run uses the same schedule code (LANS eq. 8)."""
    warmup = math.floor(warmup_ratio * steps + 1e-9)
    stage = Stage(batch_size=batch, steps=steps, peak_lr=lr, warmup_steps=warmup, const_steps=0,
                  decay_steps=steps - warmup, warmup_ratio=warmup_ratio, const_ratio=0.0)
    opt = OptimizerConfig(name=name, lr=lr, eps=1e-6 if name == "lamb" else 1e-8, weight_decay=0.01,
                          exclude_from_weight_decay=["bias", "norm"])
    return Recipe(optimizer=opt, stages=[stage], total_steps=steps)


def train(task: Task, recipe: Recipe, seed: int = 0, log_points: int = 60,
          noise: GradientNoiseScale | None = None, micro: int = 0) -> tuple[float, bool, list, list]:
    """One run. With ``noise``, each batch is accumulated from micro-batches of ``micro`` examples
    (the same gradient) and the client's estimator reads B_noise from their norms."""
    torch.manual_seed(seed)
    model = task.make_model()
    optimizer, scheduler = build(model, recipe)
    gen = torch.Generator().manual_seed(seed + 1)
    batch = recipe.stages[0].batch_size
    every = max(1, recipe.total_steps // log_points)
    curve, lrs, first = [], [], None
    halves = batch // micro if noise is not None else 1
    if noise is not None:
        noise.attach_accumulation(model.parameters(), micro, grad_scale=halves)
    for step in range(recipe.total_steps):
        x, y = task.batch(gen, batch)
        optimizer.zero_grad(set_to_none=True)
        value = 0.0
        for i in range(halves):
            lo, hi = i * batch // halves, (i + 1) * batch // halves
            loss = task.loss(model, x[lo:hi], y[lo:hi]) / halves
            value += float(loss.detach())
            if not math.isfinite(value):
                break
            loss.backward()
        first = value if first is None else first
        if not math.isfinite(value) or value > DIVERGENCE_FACTOR * first:
            return float("nan"), True, curve, lrs
        if noise is not None:
            noise.step()
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        if step % every == 0 or step == recipe.total_steps - 1:
            curve.append((step * batch, value))
    val = task.val_loss(model)
    return val, not math.isfinite(val), curve, lrs


def run(task: Task, scale: int, name: str, recipe: Recipe, *, noise_micro: int = 0, seed: int = 0) -> Result:
    t0 = time.perf_counter()
    # A 100-step memory: at 4x B0 the batch is far below B_noise late in training, where one step's
    # |G|^2 estimate is mostly noise (the default 20-step EMA can even end negative there).
    noise = GradientNoiseScale(ema=0.99) if noise_micro else None
    val, diverged, curve, lrs = train(task, recipe, seed=seed, noise=noise, micro=noise_micro)
    assert all(abs(a - lr_at(recipe, i)) <= 1e-12 * max(1.0, abs(a)) for i, a in enumerate(lrs[:50]))
    stage = recipe.stages[0]
    res = Result(task.name, scale, name, stage.batch_size, stage.peak_lr, recipe.total_steps, val, diverged,
                 time.perf_counter() - t0, curve, lrs[:: max(1, len(lrs) // 200)],
                 warmup_ratio=stage.warmup_ratio, b_noise=noise.value if noise is not None else None, seed=seed)
    print(f"  {task.name:>3} {scale:>3}x {name:<20}{f' seed {seed}' if seed else ''} batch {res.batch:>5} "
          f"steps {res.steps:>6} LR {res.lr:.5f} "
          f"warmup {stage.warmup_ratio:.4f} val {res.val_loss:.4f}{' DIVERGED' if diverged else ''}"
          f"{f' B_noise {res.b_noise:.1f}' if res.b_noise else ''} ({res.seconds:.1f}s)", flush=True)
    return res


def evidence_of(results: list[Result], names: set[str]) -> list[RunEvidence]:
    out = []
    for i, r in enumerate(results):
        if r.name in names:
            out.append(RunEvidence(batch_size=r.batch, lr=r.lr, run_id=i + 1, warmup_ratio=r.warmup_ratio,
                                   outcome="diverged" if r.diverged else "completed",
                                   metric=None if r.diverged else r.val_loss))
    return out


def oracle_grid(ref_lr: float, ref_warmup: float, scale: int, quick: bool) -> list[tuple[float, float]]:
    """LAMB (LR, warmup ratio) pairs around sqrt scaling, from the reference's warmup ratio up to the
    linear-epoch one: the sweep a team would run to find the best recipe at this batch by hand."""
    centre = ref_lr * math.sqrt(scale)
    lr_factors = (0.7, 1.4) if quick else (0.5, 1.0, 2.0)
    linear_epoch = min(ref_warmup * scale, 0.45)
    warmups = sorted({ref_warmup, math.sqrt(ref_warmup * linear_epoch), linear_epoch})
    return [(centre * f, w) for f in lr_factors for w in warmups]


def benchmark_task(task: Task, explore: int, quick: bool = False, seeds: int = 1) -> list[Result]:
    results: list[Result] = []
    recipes: dict[int, Recipe] = {}  # id(result) -> its recipe, for the runs repeated at other seeds
    ref_steps = task.examples // task.b0
    task.params = sum(p.numel() for p in task.make_model().parameters())
    # BERT's reference warms up for 1/320 of training; 1/200 here, so linear-epoch warmup reaches
    # 0.32 at 64x instead of hitting the 45% clamp.
    warmup_ratio = 0.005
    print(f"task {task.name}: {task.params:,} parameters, {task.examples:,} examples per run, "
          f"B0 {task.b0} ({ref_steps} steps), 64x = {64 * task.b0} ({ref_steps // 64} steps)", flush=True)
    for lr in task.sweep:
        results.append(run(task, 1, "ref-sweep-lamb", manual_recipe("lamb", lr, task.b0, ref_steps, warmup_ratio)))
    for lr in task.adamw_sweep:
        results.append(run(task, 1, "ref-sweep-adamw", manual_recipe("adamw", lr, task.b0, ref_steps, warmup_ratio)))
    ok = [r for r in results if not r.diverged]
    ref = min((r for r in ok if r.name == "ref-sweep-lamb"), key=lambda r: r.val_loss)
    ref_adamw = min((r for r in ok if r.name == "ref-sweep-adamw"), key=lambda r: r.val_loss)
    ref.name = "reference"
    reference = {"batch_size": task.b0, "lr": ref.lr, "optimizer": "lamb", "warmup_ratio": warmup_ratio,
                 "steps": ref_steps}
    # Every LAMB run of the study at a smaller batch is evidence for the larger ones (the oracle grid
    # included: it is the only source that varies the warmup at one batch size).
    evidence_names = {"reference", "ref-sweep-lamb", "largebatch", "largebatch+evidence", "largebatch-sweep",
                      "lamb-sqrt", "oracle-grid"}
    def add(result: Result, recipe: Recipe) -> None:
        results.append(result)
        recipes[id(result)] = recipe

    for scale in SCALES:
        batch = task.b0 * scale
        request = {"model": {"params": task.params, "family": "transformer" if task.name == "lm" else "other"},
                   "reference": reference, "target": {"batch_size": batch}}
        empty = recommend(request)
        # The client measures B_noise on the first large-batch run (micro-batches of B0, so the
        # estimator's two batch sizes are B0 and 4 B0); its value near the end (the lowest loss) is
        # the one that predicts what reaching that loss costs at larger batches.
        add(run(task, scale, "largebatch", empty, noise_micro=task.b0 if scale == SCALES[0] else 0), empty)
        learned = recommend(request, evidence=evidence_of(results, evidence_names))
        add(run(task, scale, "largebatch+evidence", learned), learned)
        steps = empty.total_steps
        peers = {"adamw-linear": manual_recipe("adamw", ref_adamw.lr * scale, batch, steps, warmup_ratio),
                 "adamw-sqrt": manual_recipe("adamw", ref_adamw.lr * math.sqrt(scale), batch, steps, warmup_ratio),
                 "lamb-sqrt": manual_recipe("lamb", ref.lr * math.sqrt(scale), batch, steps, warmup_ratio)}
        for name, recipe in peers.items():
            add(run(task, scale, name, recipe), recipe)
        for lr, w in oracle_grid(ref.lr, warmup_ratio, scale, quick):
            grid = manual_recipe("lamb", lr, batch, steps, w)
            add(run(task, scale, "oracle-grid", grid), grid)
        # What a team does with `"explore": k`: a small sweep around the recipe, logged as evidence
        # for the larger batches still to come (not at the largest scale: nothing comes after it).
        if scale != SCALES[-1] and explore:
            base = learned.stages[0].peak_lr
            for lr in explore_lrs(base, explore + 1, spread=2.0):
                if not math.isclose(lr, base):
                    swept = learned.model_copy(deep=True)
                    swept.stages[0].peak_lr = lr
                    swept.optimizer.lr = lr
                    results.append(run(task, scale, "largebatch-sweep", swept))
    # Seed 0 picked the oracle and the evidence; the same recipes at other seeds say which of the
    # regrets are larger than what a different initialisation and data order move (paired by seed).
    for seed in range(1, seeds):
        for scale in SCALES:
            oracle = oracle_of(results, scale)
            for r in [r for r in results if r.scale == scale and r.seed == 0 and (r.name in RULES or r is oracle)]:
                again = run(task, scale, r.name, recipes[id(r)], seed=seed)
                results.append(again)
    return results


RULES = ("largebatch", "largebatch+evidence", "adamw-linear", "adamw-sqrt", "lamb-sqrt")


def oracle_of(rs: list[Result], scale: int) -> Result | None:
    """The best run at this scale: the grid sweep's, or a recipe's if one beat the grid."""
    ok = [r for r in rs if r.scale == scale and r.seed == 0 and not r.diverged and r.name in (*RULES, "oracle-grid")]
    return min(ok, key=lambda r: r.val_loss) if ok else None


def predicted_examples_ratio(batch: int, b0: int, b_noise: float | None) -> float | None:
    """McCandlish et al. 2018 eq. 2.11: E(B)/E(B0) = (1 + B/B_noise)/(1 + B0/B_noise) at the same loss."""
    if not b_noise or not math.isfinite(b_noise):
        return None
    return (1 + batch / b_noise) / (1 + b0 / b_noise)


def _seed_losses(rs: list[Result], scale: int, name: str, oracle: Result | None, n_seeds: int) -> list[float | None]:
    """Per seed, the val loss of rule ``name`` (or of the oracle's grid point) at ``scale``; None if diverged."""
    by_seed = {r.seed: r for r in rs if r.scale == scale and r.name == name and (
        name != "oracle-grid" or (oracle is not None and r.lr == oracle.lr and r.warmup_ratio == oracle.warmup_ratio))}
    return [None if s not in by_seed or by_seed[s].diverged else by_seed[s].val_loss for s in range(n_seeds)]


def seeds_report(all_results: list[Result]) -> str:
    """Each rule (and the seed-0 oracle's recipe) at every seed; largebatch's loss over it, paired by seed;
    then each rule's mean loss over the seeds against the best mean at that scale (regret of the means)."""
    lines = ["| task | scale | recipe | val loss per seed | mean | largebatch vs it, per seed | "
             "largebatch+evidence vs it, per seed | verdict (largebatch, +evidence) |", "|---|---|---|---|---|---|---|---|"]

    def verdict(diffs: list[float | None]) -> str:
        if any(d is None for d in diffs):
            return "diverged"
        if all(d <= 0 for d in diffs):  # type: ignore[operator]
            return "no worse"
        if all(d > 0 for d in diffs):  # type: ignore[operator]
            return "**worse**"
        return "within seed noise"

    means = ["| task | scale | best mean over seeds | " + " | ".join(RULES) + " |",
             "|---|---|---|" + "---|" * len(RULES)]
    for task in sorted({r.task for r in all_results}):
        rs = [r for r in all_results if r.task == task]
        n_seeds = max(r.seed for r in rs) + 1
        for scale in sorted({r.scale for r in rs if r.scale > 1}):
            oracle = oracle_of(rs, scale)
            names = [*RULES, *([] if oracle is None or oracle.name in RULES else [oracle.name])]
            losses = {name: _seed_losses(rs, scale, name, oracle, n_seeds) for name in names}

            def label(name: str, oracle: Result | None = oracle) -> str:
                return f"oracle-grid ({oracle.lr:.3g}, {oracle.warmup_ratio:.3g})" if name == "oracle-grid" else name

            mean = {n: None if None in v else sum(v) / n_seeds for n, v in losses.items()}  # type: ignore[arg-type]
            finite = {n: v for n, v in mean.items() if v is not None}
            if finite:
                best = min(finite, key=finite.__getitem__)
                means.append(f"| {task} | {scale}x | {label(best)} {finite[best]:.4f} | " + " | ".join(
                    "diverged" if mean[n] is None else f"{mean[n] / finite[best] - 1:+.2%}" for n in RULES) + " |")
            for name, theirs in losses.items():
                cells = []
                for mine in (losses[n] for n in RULES[:2]):
                    diffs = [None if a is None or b is None else a / b - 1 for a, b in zip(mine, theirs, strict=True)]
                    cells.append((", ".join("-" if d is None else f"{d:+.2%}" for d in diffs), verdict(diffs)))
                ok = [v for v in theirs if v is not None]
                lines.append(f"| {task} | {scale}x | {label(name)} | "
                             f"{', '.join('nan' if v is None else f'{v:.4f}' for v in theirs)}"
                             f" | {sum(ok) / len(ok) if ok else float('nan'):.4f} | {cells[0][0]} | {cells[1][0]} | "
                             f"{'-' if name in RULES[:2] else f'{cells[0][1]}, {cells[1][1]}'} |")
    return "\n".join(lines) + "\n\n" + "\n".join(means)


def report(all_results: list[Result], out: pathlib.Path) -> str:
    lines = ["| task | scale | recipe | batch | steps | peak LR | warmup | val loss | regret vs oracle | vs reference |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    summary = ["| task | scale | B_noise predicts E(B)/E(B0) | oracle (LR, warmup) | oracle vs reference | "
               + " | ".join(f"{n} regret" for n in RULES) + " |",
               "|---|---|---|---|---|" + "---|" * len(RULES)]
    for task in sorted({r.task for r in all_results}):
        rs = [r for r in all_results if r.task == task and r.seed == 0]
        ref = next(r for r in rs if r.name == "reference")
        lines.append(f"| {task} | 1x | reference (LAMB, tuned) | {ref.batch} | {ref.steps} | {ref.lr:.4g} | "
                     f"{ref.warmup_ratio if ref.warmup_ratio is not None else float('nan'):.4g} | "
                     f"{ref.val_loss:.4f} | - | - |")
        for scale in sorted({r.scale for r in rs if r.scale > 1}):
            oracle = oracle_of(rs, scale)
            for r in rs:
                if r.scale != scale or r.name not in RULES:
                    continue
                if r.diverged:
                    regret = rel = "diverged"
                else:
                    regret = f"{r.val_loss / oracle.val_loss - 1:+.2%}" if oracle else "-"
                    rel = f"{r.val_loss / ref.val_loss - 1:+.2%}"
                lines.append(f"| {task} | {r.scale}x | {r.name} | {r.batch} | {r.steps} | {r.lr:.4g} | "
                             f"{r.warmup_ratio if r.warmup_ratio is not None else float('nan'):.4g} | "
                             f"{'nan' if r.diverged else f'{r.val_loss:.4f}'} | {regret} | {rel} |")
            if oracle is None:
                continue
            lines.append(f"| {task} | {scale}x | oracle ({oracle.name}) | {oracle.batch} | {oracle.steps} | "
                         f"{oracle.lr:.4g} | {oracle.warmup_ratio:.4g} | {oracle.val_loss:.4f} | - | "
                         f"{oracle.val_loss / ref.val_loss - 1:+.2%} |")
            b_noise = next((r.b_noise for r in rs if r.b_noise), None)
            pred = predicted_examples_ratio(oracle.batch, ref.batch, b_noise)
            regrets = []
            for name in RULES:
                r = next((r for r in rs if r.scale == scale and r.name == name), None)
                regrets.append("-" if r is None else "diverged" if r.diverged
                               else f"{r.val_loss / oracle.val_loss - 1:+.2%}")
            summary.append(f"| {task} | {scale}x | {'-' if pred is None else f'{pred:.2f} (B_noise {b_noise:.0f})'}"
                           f" | {oracle.lr:.3g}, {oracle.warmup_ratio:.3g} | "
                           f"{oracle.val_loss / ref.val_loss - 1:+.2%} | " + " | ".join(regrets) + " |")
    table = "\n".join(lines) + "\n\n" + "\n".join(summary)
    if any(r.seed for r in all_results):
        table += "\n\n" + seeds_report(all_results)
    (out / "scaling_fidelity.md").write_text(table + "\n")
    (out / "scaling_fidelity.json").write_text(json.dumps([r.__dict__ for r in all_results], indent=1))
    return table


def plot(all_results: list[Result], out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r.task for r in all_results})
    fig, axes = plt.subplots(len(tasks), 4, figsize=(18, 4 * len(tasks)), squeeze=False)
    names = list(RULES)
    for row, task in enumerate(tasks):
        rs = [r for r in all_results if r.task == task and r.seed == 0]
        ref = next(r for r in rs if r.name == "reference")
        for col, scale in enumerate(SCALES):
            ax = axes[row][col]
            ax.plot(*zip(*ref.curve, strict=False), color="black", lw=1, label="reference (1x)")
            for name in names:
                r = next((r for r in rs if r.scale == scale and r.name == name), None)
                if r and r.curve:
                    ax.plot(*zip(*r.curve, strict=False), lw=1.2, label=f"{name}{' (diverged)' if r.diverged else ''}")
            ax.set_title(f"{task}: {scale}x B0 training loss")
            ax.set_xlabel("examples seen")
            ax.set_ylabel("train loss")
            ax.set_ylim(top=ref.curve[0][1] * 1.1)
            ax.legend(fontsize=7)
        ax = axes[row][3]
        for name in names:
            r = next((r for r in rs if r.scale == SCALES[-1] and r.name == name), None)
            if r and r.lrs:
                ax.plot([i / len(r.lrs) for i in range(len(r.lrs))], r.lrs, label=name)
        ax.set_title(f"{task}: LR schedules at {SCALES[-1]}x")
        ax.set_xlabel("fraction of training")
        ax.set_ylabel("learning rate")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scaling_fidelity.png", dpi=80)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: the whole run in under 3 minutes")
    parser.add_argument("--tasks", default="lm,mlp")
    parser.add_argument("--explore", type=int, default=2, help="extra LRs swept at 4x and 16x as evidence")
    parser.add_argument("--seeds", type=int, default=1,
                        help="run every rule and the oracle's recipe again at seeds 1..N-1 (a paired table)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "out")
    parser.add_argument("--merge", type=pathlib.Path, nargs="+", metavar="DIR",
                        help="train nothing: one table and plot from the scaling_fidelity.json of earlier runs "
                             "(e.g. one process per task, run side by side)")
    args = parser.parse_args(argv)
    if args.merge:
        merged = [Result(**r) for d in args.merge for r in json.loads((d / "scaling_fidelity.json").read_text())]
        args.out.mkdir(parents=True, exist_ok=True)
        print(report(merged, args.out))
        plot(merged, args.out)
        return 0
    # Tiny models: one thread avoids OpenMP spin contention, which costs 10x on a busy 2-core machine.
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    makers = {"lm": lm_task, "mlp": mlp_task}
    t0 = time.perf_counter()
    results: list[Result] = []
    for name in args.tasks.split(","):
        results += benchmark_task(makers[name](args.quick), args.explore, args.quick, args.seeds)
    table = report(results, args.out)
    plot(results, args.out)
    print(table)
    print(f"total {time.perf_counter() - t0:.0f}s; wrote {args.out}/scaling_fidelity.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
