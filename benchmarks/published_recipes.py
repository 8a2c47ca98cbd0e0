"""Published recipes vs largebatch: every vector of `largebatch.scaling_rules.published`, evaluated.

    python benchmarks/published_recipes.py            # print the markdown table
    python benchmarks/published_recipes.py --readme   # rewrite README.md's table between its markers

Exit status 1 when a row is outside its tolerance (the same check as
tests/scaling_rules/test_published_recipes.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from largebatch.scaling_rules.published import VECTORS, check, error

START, END = "<!-- published-recipes:start -->", "<!-- published-recipes:end -->"


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
        elif v.kind == "bound":
            tol = f"<= published, >= 1/{v.tolerance:g}: {v.why}"
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", type=Path, nargs="?", const=Path(__file__).resolve().parents[1] / "README.md",
                   help="rewrite the table between the markers of this README")
    args = p.parse_args(argv)
    text, bad = table()
    if args.readme:
        readme = args.readme.read_text()
        if START not in readme or END not in readme:
            print(f"{args.readme}: markers {START} / {END} not found", file=sys.stderr)
            return 2
        head, rest = readme.split(START, 1)
        _, tail = rest.split(END, 1)
        args.readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")
    print(text)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
