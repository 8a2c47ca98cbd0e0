"""Published recipes vs largebatch: the seeds' vectors (`largebatch.scaling_rules.published`) and the
published corpus (`scaling_rules/corpus.csv`), scored with its fixed bands, as shipped and under
leave-one-source-out cross-validation of every fitted constant.

    python benchmarks/published_recipes.py            # print both README tables
    python benchmarks/published_recipes.py --rows     # also every corpus row, engine vs published
    python benchmarks/published_recipes.py --readme   # rewrite README.md between its markers

Exit status 1 when a vector is outside its tolerance (the same check as
tests/scaling_rules/test_published_recipes.py); corpus rows outside their band are reported, not
failed (tests/scaling_rules/test_corpus.py holds the floor).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from largebatch.scaling_rules import corpus
from largebatch.scaling_rules.published import VECTORS, check, error

START, END = "<!-- published-recipes:start -->", "<!-- published-recipes:end -->"
CORPUS_START, CORPUS_END = "<!-- published-corpus:start -->", "<!-- published-corpus:end -->"


def _show(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def table() -> tuple[str, int]:
    lines = ["| source | case | quantity | published | largebatch | error | tolerance |",
             "|---|---|---|---:|---:|---:|---|"]
    bad = 0
    for v in VECTORS:
        got = v.value()
        ok = check(v, got)
        bad += not ok
        err = error(v, got)
        if v.tolerance is None:
            tol = "equal"
        elif v.tolerance <= 1e-9:
            tol = "exact"
        else:
            tol = f"{v.tolerance:.0%}: {v.why}"
        lines.append(f"| {v.source} | {v.case} | {v.quantity} | {_show(v.published)} | {_show(got)} | "
                     f"{'' if err is None else f'{err:+.1%}'} | {tol}{'' if ok else ' **OUT**'} |")
    n_sources = len({v.source for v in VECTORS})
    lines.append("")
    lines.append(f"{len(VECTORS)} rows from {n_sources} sources; {len(VECTORS) - bad} within tolerance.")
    return "\n".join(lines), bad


def _band(quantity: str) -> str:
    b = corpus.BANDS.get(quantity)
    if b is None:
        return "exact"
    return f"x/÷{b:g}" if quantity in corpus.FACTOR_QUANTITIES else f"±{b:.0%}"


def _factor(log_err: float) -> str:
    return "none" if not math.isfinite(log_err) else f"x{math.exp(log_err):.2f}"


def corpus_table(rows: list[corpus.Row], results: list[corpus.Result], cv: list[corpus.Result]) -> str:
    lines = ["| rule | quantity | rows | within band | within band, leave-one-source-out | median error, "
             "leave-one-source-out | band |", "|---|---|---:|---:|---:|---:|---|"]
    for kind, label in (("prediction", ""), ("seed", "seed: "), ("arithmetic", "arithmetic: ")):
        for line in corpus.summary(results, cv, kind):
            if kind != "prediction" and line.rule != "all":
                continue
            rule = f"**{label}all**" if line.rule == "all" else line.rule
            q = "" if line.quantity == "all" else line.quantity
            band = "as above" if kind == "prediction" and line.rule == "all" else (
                "exact" if kind == "seed" else ("per quantity" if line.rule == "all" else _band(q)))
            lines.append(f"| {rule} | {q} | {line.rows} | {line.within} ({line.fraction:.0%}) | "
                         f"{line.within_cv} ({line.fraction_cv:.0%}) | {_factor(line.median_cv_error)} | {band} |")
    fit, per = corpus.size_law_cv(rows)
    fits = [a for a, _ in per.values()]
    worst = max(per.items(), key=lambda kv: kv[1][1])
    mean_err = sum(e for _, e in per.values()) / len(per)
    preds = [r for r in rows if r.kind == "prediction"]
    lines += ["",
              f"{len(rows)} rows from {len({r.source for r in rows})} sources ({len(preds)} predictions from "
              f"{len({r.source for r in preds})} sources; {sum(r.kind == 'seed' for r in rows)} seed rows scored exactly; "
              f"{sum(r.kind == 'arithmetic' for r in rows)} arithmetic rows not counted).",
              f"Size law at a fixed batch (`fit_size_exponent`, {len(per)} families): LR ~ N^{fit:.3f}; "
              f"left out one family at a time the fit stays in N^{min(fits):.3f} .. N^{max(fits):.3f}, and predicts "
              f"the left-out family's LRs with a mean error of {_factor(mean_err)} (worst: {worst[0]}, "
              f"{_factor(worst[1][1])}). The engine uses N^{corpus.engine_size_exponent():.3f}."]
    return "\n".join(lines)


def rows_table(results: list[corpus.Result], cv: list[corpus.Result]) -> str:
    cv_by_id = {r.row.id: r for r in cv}
    lines = ["| id | source | locator | quantity | published | largebatch | leave-one-source-out | in band |",
             "|---|---|---|---|---:|---:|---:|---|"]
    for r in results:
        c = cv_by_id[r.row.id]
        unit = f" {r.row.unit}" if r.row.unit else ""
        lines.append(f"| {r.row.id} | {r.row.source} | {r.row.locator} | {r.row.quantity}{unit} | "
                     f"{_show(r.row.published)} | {_show(r.got) if not r.error else r.error} | {_show(c.got)} | "
                     f"{'yes' if r.within else '**no**'} ({r.row.kind}) |")
    return "\n".join(lines)


def _replace(readme: str, start: str, end: str, text: str) -> str:
    if start not in readme or end not in readme:
        # A section the README does not have yet goes after the vectors' table.
        head, tail = readme.split(END, 1)
        return f"{head}{END}\n\n{start}\n{text}\n{end}{tail}"
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{text}\n{end}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", type=Path, nargs="?", const=Path(__file__).resolve().parents[1] / "README.md",
                   help="rewrite the tables between the markers of this README")
    p.add_argument("--rows", action="store_true", help="also print every corpus row")
    args = p.parse_args(argv)
    text, bad = table()
    rows = corpus.load()
    results, cv = corpus.score(rows), corpus.leave_one_source_out(rows)
    ctext = corpus_table(rows, results, cv)
    if args.readme:
        readme = args.readme.read_text()
        if START not in readme or END not in readme:
            print(f"{args.readme}: markers {START} / {END} not found", file=sys.stderr)
            return 2
        readme = _replace(readme, START, END, text)
        args.readme.write_text(_replace(readme, CORPUS_START, CORPUS_END, ctext))
    print(text)
    print()
    print(ctext)
    if args.rows:
        print()
        print(rows_table(results, cv))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
