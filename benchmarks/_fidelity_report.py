"""What scaling_fidelity.py's runs say: the seed plan, the paired non-inferiority verdicts, the tables and the plot.

The training side hands over ``Result`` rows and nothing else, so a report can be rebuilt from the JSON
of earlier runs (``--merge``) without torch. Seed roles: seed 0 tunes (the reference LR, the oracle,
the evidence), seed 1 is the pilot whose spread sizes the held-out set, seeds 2.. are held out; only
held-out seeds enter a mean, an interval or a test.
"""

from __future__ import annotations

import json
import math
import pathlib
from dataclasses import dataclass, field

from largebatch.scaling_rules.stats import holm, non_inferiority, seeds_for_margin

SCALES = (4, 16, 64)
RULES = ("largebatch", "largebatch+evidence", "largebatch-adamw", "largebatch-adamw+evidence", "adamw-linear",
         "adamw-sqrt", "lamb-sqrt")
CANDIDATES = RULES[:4]
PEERS = RULES[4:]
# Which reference each rule scales: the tuned LAMB one, or the tuned AdamW one.
REFERENCES = ("reference", "reference-adamw")
SCALED_FROM = {"largebatch": "lamb", "largebatch+evidence": "lamb", "largebatch-adamw": "adamw",
               "largebatch-adamw+evidence": "adamw", "adamw-linear": "adamw", "adamw-sqrt": "adamw", "lamb-sqrt": "lamb"}
TUNING_SEED, PILOT_SEED, FIRST_HELD_OUT = 0, 1, 2
# The largest relative val-loss deficit still called "no worse": the MLP's seed spread is ~0.1-0.3%,
# the LM's ~1%; a margin below the spread would need more seeds than the CPU budget holds.
MARGINS = {"mlp": 0.005, "lm": 0.01}
ALPHA, POWER = 0.05, 0.8
VERDICTS = ("non-inferior", "inferior", "undecided")


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
    seed: int = 0  # the model's initialisation and the data order (see the module's seed roles)


def oracle_of(rs: list[Result], scale: int) -> Result | None:
    """The best tuning-seed run at this scale: the grid sweep's, or a recipe's if one beat the grid."""
    ok = [r for r in rs if r.scale == scale and r.seed == TUNING_SEED and not r.diverged
          and r.name in (*RULES, "oracle-grid", "oracle-grid-adamw")]
    return min(ok, key=lambda r: r.val_loss) if ok else None


def predicted_examples_ratio(batch: int, b0: int, b_noise: float | None) -> float | None:
    """McCandlish et al. 2018 eq. 2.11: E(B)/E(B0) = (1 + B/B_noise)/(1 + B0/B_noise) at the same loss."""
    if not b_noise or not math.isfinite(b_noise):
        return None
    return (1 + batch / b_noise) / (1 + b0 / b_noise)


def scales_in(rs: list[Result]) -> list[int]:
    """The scales these runs trained: all of SCALES, or a prefix of them (``--scales``)."""
    return [s for s in SCALES if any(r.scale == s for r in rs)]


def _loss(rs: list[Result], scale: int, name: str, seed: int) -> float | None:
    """A run's val loss; None if it diverged or never ran."""
    r = next((r for r in rs if r.scale == scale and r.name == name and r.seed == seed), None)
    return None if r is None or r.diverged else r.val_loss


# ---------------------------------------------------------------- how many held-out seeds


def pilot_spread(rs: list[Result]) -> tuple[float, int]:
    """The sd of a paired difference (candidate over peer) between two seeds, pooled over every scale,
    candidate and peer where the four runs finished: from the tuning seed and the pilot, one degree of
    freedom each."""
    squares = []
    for scale in SCALES:
        for cand in CANDIDATES:
            for peer in PEERS:
                runs = [_loss(rs, scale, n, s) for s in (TUNING_SEED, PILOT_SEED) for n in (cand, peer)]
                if None not in runs:
                    d0, d1 = runs[0] / runs[1] - 1, runs[2] / runs[3] - 1  # type: ignore[operator]
                    squares.append((d0 - d1) ** 2 / 2)
    return (math.sqrt(sum(squares) / len(squares)) if squares else math.nan), len(squares)


def seed_plan(rs: list[Result], task: str, *, minimum: int, cap: int, override: int | None = None,
              cap_why: str = "the time budget's cap") -> dict:
    """The held-out seed count: seeds_for_margin from the pilot's spread, clipped to [minimum, cap]
    (cap: what the time budget holds), unless ``override`` says otherwise."""
    sd, pairs = pilot_spread(rs)
    margin = MARGINS[task]
    wanted = seeds_for_margin(sd, margin, alpha=ALPHA, power=POWER, tests=len(PEERS), minimum=2) \
        if math.isfinite(sd) else None
    if override is not None:
        n, why = override, f"--seeds {override} overrides the calculation"
    elif wanted is None:
        n, why = minimum, f"no pilot pair finished: the minimum, {minimum}"
    else:
        n = max(minimum, min(wanted, cap))
        why = ("the calculation's" if n == wanted else
               f"the minimum ({minimum})" if n == minimum and wanted < minimum else
               f"the minimum ({minimum}), over {cap_why} ({cap}): underpowered" if cap < minimum else
               f"{cap_why} ({cap}): underpowered, expect 'undecided' where the spread is this large")
    return {"task": task, "sd": sd, "pairs": pairs, "margin": margin, "alpha": ALPHA, "power": POWER,
            "tests": len(PEERS), "wanted": wanted, "cap": cap, "n": n, "why": why}


def plan_line(p: dict) -> str:
    return (f"power: {p['task']}: sd of paired differences {p['sd']:.2%} (pilot seed {PILOT_SEED} vs tuning seed "
            f"{TUNING_SEED}, pooled over {p['pairs']} comparisons), margin {p['margin']:.1%}, alpha {p['alpha']} "
            f"one-sided, Holm over {p['tests']} peers (worst case {p['alpha'] / p['tests']:.4f}), power {p['power']}"
            f" -> {p['wanted'] if p['wanted'] is not None else '-'} seeds; running {p['n']} held-out seeds "
            f"({p['why']})")


# ---------------------------------------------------------------- verdicts


def _held_out(rs: list[Result], scale: int, name: str) -> dict[int, float | None]:
    seeds = sorted({r.seed for r in rs if r.seed >= FIRST_HELD_OUT})
    return {s: _loss(rs, scale, name, s) for s in seeds}


def verdicts(rs: list[Result], task: str, scale: int, cand: str) -> list[dict]:
    """largebatch (or +evidence) against each peer at one scale: paired one-sided bounds, Holm over
    the peers (for 'non-inferior' and, on the mirrored p, for 'inferior')."""
    margin = MARGINS[task]
    mine = _held_out(rs, scale, cand)
    rows = []
    for peer in PEERS:
        theirs = _held_out(rs, scale, peer)
        row = {"task": task, "scale": scale, "cand": cand, "peer": peer, "n": len(mine), "test": None}
        lost = [s for s, v in mine.items() if v is None]
        pairs = [(v, theirs[s]) for s, v in mine.items() if v is not None and theirs.get(s) is not None]
        peer_lost = sum(theirs.get(s) is None for s in mine)
        if lost:
            row.update(p=1.0, verdict="inferior", why=f"{cand} diverged at {len(lost)}/{len(mine)} held-out seeds")
        elif mine and peer_lost == len(mine):
            row.update(p=0.0, verdict="non-inferior", why=f"peer diverged at {peer_lost}/{len(mine)} held-out seeds")
        elif len(pairs) < 2:
            row.update(p=1.0, verdict="undecided", why=f"{len(pairs)} seed(s) where both finished: no test")
        else:
            row["test"] = non_inferiority([a / b - 1 for a, b in pairs], margin, ALPHA)
            row["p"] = row["test"].p
            row["n"] = len(pairs)
            row["note"] = f" (peer diverged at {peer_lost} seeds, left out)" if peer_lost else ""
        rows.append(row)
    tested = [r for r in rows if r["test"] is not None]
    no_worse = holm([r["p"] for r in rows], ALPHA)
    worse = holm([1 - r["p"] for r in tested], ALPHA) if tested else []
    for row, ok in zip(rows, no_worse, strict=True):
        t = row["test"]
        if t is None:
            continue
        bad = worse[tested.index(row)]
        if ok:
            row.update(verdict="non-inferior", why=f"upper bound {t.upper:+.2%} < margin {margin:.1%}, Holm")
        elif bad:
            row.update(verdict="inferior", why=f"lower bound {t.lower:+.2%} > margin {margin:.1%}, Holm")
        else:
            k = len(rows)
            if t.mean < margin:
                need = seeds_for_margin(t.sd, margin, tests=k, true_difference=t.mean, minimum=2)
                goal = "non-inferior"
            else:
                need = seeds_for_margin(t.sd, -margin, tests=k, true_difference=-t.mean, minimum=2)
                goal = "inferior"
            if goal == "inferior":
                head = (f"mean {t.mean:+.2%} >= margin {margin:.1%}, lower bound {t.lower:+.2%} "
                        + (f"> margin but p {1 - t.p:.3f} fails Holm over {k}" if t.lower > margin else "<= margin"))
            elif t.upper >= margin:
                head = f"upper bound {t.upper:+.2%} >= margin {margin:.1%}"
            else:
                head = f"upper bound {t.upper:+.2%} < margin {margin:.1%} but p {t.p:.3f} fails Holm over {k}"
            more = f">= {need}" if need >= 64 else f"~{need}"
            row.update(verdict="undecided", why=f"{head}; sd {t.sd:.2%} over {t.n} seeds: {more} seeds would "
                                                f"decide ({goal}, at this mean, 80% power)")
        row["why"] += row.get("note", "")
    return rows


def _pct(x: float) -> str:
    return f"{x:+.2%}"


def reference_gap_table(all_results: list[Result]) -> str:
    """The two tuned references at B0, paired by held-out seed: what separates rules that scale different
    references before any rule has scaled anything."""
    lines = ["| task | AdamW reference (LR) | LAMB reference (LR) | held-out seeds | AdamW/LAMB - 1 [95% CI] |",
             "|---|---|---|---|---|"]
    for task in sorted({r.task for r in all_results}):
        rs = [r for r in all_results if r.task == task]
        lamb, adamw = (_held_out(rs, 1, name) for name in REFERENCES)
        diffs = [adamw[s] / v - 1 for s, v in lamb.items() if v is not None and adamw.get(s) is not None]
        if len(diffs) < 2:
            continue
        t = non_inferiority(diffs, 0.0, alpha=0.025)
        lr = {r.name: r.lr for r in rs if r.name in REFERENCES and r.seed == TUNING_SEED}
        lines.append(f"| {task} | {lr[REFERENCES[1]]:.3g} | {lr[REFERENCES[0]]:.3g} | {len(diffs)} | "
                     f"{_pct(t.mean)} [{_pct(t.lower)}, {_pct(t.upper)}] |")
    return "\n".join(lines) if len(lines) > 2 else ""


def verdict_table(all_results: list[Result]) -> str:
    lines = ["| task | scale | candidate | peer | scaled from | held-out seeds | mean (candidate/peer - 1) | sd | "
             "one-sided 95% upper | one-sided 95% lower | margin | p | verdict | why |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for task in sorted({r.task for r in all_results}):
        rs = [r for r in all_results if r.task == task]
        for scale in scales_in(rs):
            for cand in CANDIDATES:
                for row in verdicts(rs, task, scale, cand):
                    t = row["test"]
                    stats = [_pct(t.mean), f"{t.sd:.2%}", _pct(t.upper), _pct(t.lower)] if t else ["-"] * 4
                    same = SCALED_FROM[cand] == SCALED_FROM[row["peer"]]
                    origin = f"both {SCALED_FROM[cand]}" if same else f"{SCALED_FROM[cand]} / {SCALED_FROM[row['peer']]}"
                    lines.append(f"| {task} | {scale}x | {cand} | {row['peer']} | {origin} | {row['n']} | "
                                 + " | ".join(stats)
                                 + f" | {MARGINS[task]:.1%} | {row['p']:.3g} | {row['verdict']} | {row['why']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- tables


def tuning_table(all_results: list[Result]) -> str:
    """Seed 0's runs: what picked the reference LR, the oracle and the evidence (its regrets carry the
    winner's curse, so no claim rests on them)."""
    lines = ["| task | scale | recipe (tuning seed 0) | batch | steps | peak LR | warmup | val loss | "
             "regret vs oracle | vs reference |", "|---|---|---|---|---|---|---|---|---|---|"]
    for task in sorted({r.task for r in all_results}):
        rs = [r for r in all_results if r.task == task and r.seed == TUNING_SEED]
        ref = next(r for r in rs if r.name == "reference")
        lines.append(f"| {task} | 1x | reference (LAMB, tuned) | {ref.batch} | {ref.steps} | {ref.lr:.4g} | "
                     f"{ref.warmup_ratio:.4g} | {ref.val_loss:.4f} | - | - |")
        other = next((r for r in rs if r.name == REFERENCES[1]), None)
        if other is not None:
            lines.append(f"| {task} | 1x | reference-adamw (AdamW, tuned) | {other.batch} | {other.steps} | "
                         f"{other.lr:.4g} | {other.warmup_ratio:.4g} | {other.val_loss:.4f} | - | "
                         f"{_pct(other.val_loss / ref.val_loss - 1)} |")
        for scale in scales_in(rs):
            oracle = oracle_of(rs, scale)
            # The AdamW sweep's best, beside the rules: where AdamW's best LR went at this batch.
            swept = min((r for r in rs if r.scale == scale and r.name == "oracle-grid-adamw" and not r.diverged),
                        key=lambda r: r.val_loss, default=None)
            rows = [(r, r.name) for r in rs if r.scale == scale and r.name in RULES]
            rows += [(swept, "AdamW sweep (best)"), (oracle, None)]
            for r, label in rows:
                if r is None:
                    continue
                last = label is None
                name = f"oracle ({r.name})" if last else label
                regret = "diverged" if r.diverged else "-" if last or not oracle else \
                    _pct(r.val_loss / oracle.val_loss - 1)
                rel = "diverged" if r.diverged else _pct(r.val_loss / ref.val_loss - 1)
                lines.append(f"| {task} | {scale}x | {name} | {r.batch} | {r.steps} | {r.lr:.4g} | "
                             f"{r.warmup_ratio:.4g} | {'nan' if r.diverged else f'{r.val_loss:.4f}'} | {regret} | {rel} |")
    return "\n".join(lines)


def held_out_table(all_results: list[Result]) -> str:
    """Per scale, each rule's regret against the oracle's recipe (picked on seed 0), paired by held-out
    seed: the mean and its two-sided 95% interval."""
    lines = ["| task | scale | B_noise predicts E(B)/E(B0) | oracle (LR, warmup), held-out mean loss | "
             + " | ".join(f"{n} regret [95% CI]" for n in RULES) + " |", "|---|---|---|---|" + "---|" * len(RULES)]
    for task in sorted({r.task for r in all_results}):
        rs = [r for r in all_results if r.task == task]
        ref = next(r for r in rs if r.name == "reference")
        b_noise = next((r.b_noise for r in rs if r.b_noise), None)
        for scale in scales_in(rs):
            oracle = oracle_of(rs, scale)
            if oracle is None:
                continue
            pred = predicted_examples_ratio(oracle.batch, ref.batch, b_noise)
            best = _held_out(rs, scale, oracle.name)
            finite = [v for v in best.values() if v is not None]
            cells = []
            for name in RULES:
                mine = _held_out(rs, scale, name)
                diffs = [v / best[s] - 1 for s, v in mine.items() if v is not None and best.get(s) is not None]
                lost = sum(v is None for v in mine.values())
                if lost:
                    cells.append(f"diverged {lost}/{len(mine)}")
                elif len(diffs) < 2:
                    cells.append("-")
                else:
                    t = non_inferiority(diffs, 0.0, alpha=0.025)  # one-sided 97.5% each way: a 95% interval
                    cells.append(f"{_pct(t.mean)} [{_pct(t.lower)}, {_pct(t.upper)}]")
            mean = f"{sum(finite) / len(finite):.4f}" if finite else "-"
            lines.append(f"| {task} | {scale}x | {'-' if pred is None else f'{pred:.2f} (B_noise {b_noise:.0f})'} | "
                         f"{oracle.name} {oracle.lr:.3g}, {oracle.warmup_ratio:.3g}: {mean} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(all_results: list[Result], plans: dict[str, dict], out: pathlib.Path) -> str:
    held = sorted({r.seed for r in all_results if r.seed >= FIRST_HELD_OUT})
    header = "\n".join(plan_line(plans[t]) for t in sorted(plans)) + (
        f"\nheld-out seeds: {', '.join(map(str, held))} (tuning seed {TUNING_SEED} and pilot seed {PILOT_SEED} "
        "enter no mean, interval or test)")
    parts = [header, tuning_table(all_results), held_out_table(all_results), reference_gap_table(all_results),
             verdict_table(all_results)]
    table = "\n\n".join(p for p in parts if p)
    (out / "scaling_fidelity.md").write_text(table + "\n")
    (out / "scaling_fidelity.json").write_text(json.dumps(
        {"plans": plans, "results": [r.__dict__ for r in all_results]}, indent=1))
    return table


def _key(r: Result) -> tuple:
    return r.task, r.scale, r.name, r.seed, r.batch, r.steps, r.lr, r.warmup_ratio


def load(dirs: list[pathlib.Path], held_out_from: int = FIRST_HELD_OUT) -> tuple[list[Result], dict[str, dict]]:
    """The runs of earlier processes as one set. Processes may split a task's held-out seeds
    (``--first-held-out``): each repeats the deterministic tuning seed and pilot, which must agree to the
    bit, and the copy is dropped. ``held_out_from`` keeps only the held-out seeds from that one on (the
    seeds a verdict had not yet seen when more were asked for)."""
    results: list[Result] = []
    plans: dict[str, list[dict]] = {}
    for d in dirs:
        data = json.loads((d / "scaling_fidelity.json").read_text())
        if isinstance(data, list):
            raise SystemExit(f"{d}: written before tuning, pilot and held-out seeds had roles; run it again")
        earlier = {_key(r): r for r in results}
        for row in data["results"]:
            r = Result(**row)
            seen = earlier.get(_key(r))
            if seen is None:
                results.append(r)
            elif seen.diverged != r.diverged or not (r.diverged or seen.val_loss == r.val_loss):
                raise SystemExit(f"{d}: {r.task} {r.scale}x {r.name} seed {r.seed} reads {r.val_loss} where an "
                                 f"earlier directory's identical run read {seen.val_loss}: merge only runs of the "
                                 "same code on the same machine")
        for task, plan in data["plans"].items():
            plans.setdefault(task, []).append(plan)
    results = [r for r in results if not FIRST_HELD_OUT <= r.seed < held_out_from]
    merged = {}
    for task, ps in plans.items():
        held = sorted({r.seed for r in results if r.task == task and r.seed >= FIRST_HELD_OUT})
        if len(ps) == 1 and held_out_from == FIRST_HELD_OUT:
            merged[task] = ps[0]
            continue
        span = f"seeds {held[0]}-{held[-1]}" if held else "no seeds"
        merged[task] = {**ps[0], "n": len(held), "why": f"{len(ps)} run(s) merged, held-out {span}"
                        + (f" (from seed {held_out_from} on: those no verdict had seen)"
                           if held_out_from > FIRST_HELD_OUT else "")}
    return results, merged


def plot(all_results: list[Result], out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r.task for r in all_results})
    scales = scales_in(all_results)
    fig, axes = plt.subplots(len(tasks), len(scales) + 1, figsize=(4.5 * len(scales) + 4.5, 4 * len(tasks)),
                             squeeze=False)
    for row, task in enumerate(tasks):
        rs = [r for r in all_results if r.task == task and r.seed == TUNING_SEED]
        ref = next(r for r in rs if r.name == "reference")
        for col, scale in enumerate(scales):
            ax = axes[row][col]
            ax.plot(*zip(*ref.curve, strict=False), color="black", lw=1, label="reference (1x)")
            for name in RULES:
                r = next((r for r in rs if r.scale == scale and r.name == name), None)
                if r and r.curve:
                    ax.plot(*zip(*r.curve, strict=False), lw=1.2, label=f"{name}{' (diverged)' if r.diverged else ''}")
            ax.set_title(f"{task}: {scale}x B0 training loss (seed 0)")
            ax.set_xlabel("examples seen")
            ax.set_ylabel("train loss")
            ax.set_ylim(top=ref.curve[0][1] * 1.1)
            ax.legend(fontsize=7)
        ax = axes[row][len(scales)]
        for name in RULES:
            r = next((r for r in rs if r.scale == scales[-1] and r.name == name), None)
            if r and r.lrs:
                ax.plot([i / len(r.lrs) for i in range(len(r.lrs))], r.lrs, label=name)
        ax.set_title(f"{task}: LR schedules at {scales[-1]}x")
        ax.set_xlabel("fraction of training")
        ax.set_ylabel("learning rate")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scaling_fidelity.png", dpi=80)
