"""``largebatch runs list|show`` and ``largebatch studies list|show``: the service, as tables.

Registered through the ``largebatch.commands`` entry points (``register_runs``,
``register_studies``). Every command takes ``--url`` (default ``$LARGEBATCH_URL``, else
http://127.0.0.1:8000) and ``--api-key`` (default ``$LARGEBATCH_API_KEY``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from largebatch.scaling_rules.cli import CLIError, format_recipe_table, parse_count
from largebatch.scaling_rules.wire import Run, Study

from . import errors
from ._base import DEFAULT_URL
from ._client import Client

__all__ = ["format_runs_table", "format_studies_table", "register_runs", "register_studies"]

_STATES = ["running", "completed", "diverged", "failed", "preempted", "pruned"]


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--url", default=os.environ.get("LARGEBATCH_URL") or DEFAULT_URL,
                   help="service URL (default: $LARGEBATCH_URL or %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("LARGEBATCH_API_KEY") or None,
                   help="API key (default: $LARGEBATCH_API_KEY)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default: 10)")
    return p


# Numbers read as `largebatch recommend` reads them (32K, 1.5M; the same messages for a bad one),
# so a batch size is typed and refused alike in every subcommand.


def _batch_size(text: str) -> int:
    value = parse_count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive count, got {text!r}")
    return value


def _positive(text: str) -> int:
    return _batch_size(text)


def _nonnegative(text: str) -> int:
    if text.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return parse_count(text)


def _run_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a run id: {text!r} (the id column of `largebatch runs list`)")
    return value


# ------------------------------------------------------------------------------------ registration


def register_runs(sub: argparse._SubParsersAction) -> None:
    common = _common()
    p = sub.add_parser("runs", help="list and show runs on a largebatch service",
                       description="Runs of a study on a largebatch service.")
    rs = p.add_subparsers(dest="runs_command", required=True, metavar="{list,show}")
    ls = rs.add_parser("list", parents=[common], help="a study's runs, as a table",
                       description="List a study's runs (oldest first).")
    ls.add_argument("study", help="study name")
    ls.add_argument("--state", choices=_STATES, help="only runs in this state")
    ls.add_argument("--batch-size", type=_batch_size, help="only runs at this batch size, e.g. 32K")
    ls.add_argument("--limit", type=_positive, default=100, help="page size (default: 100, at most 1000)")
    ls.add_argument("--offset", type=_nonnegative, default=0, help="skip this many runs")
    fmt = ls.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the page as JSON")
    fmt.add_argument("--csv", action="store_true", help="print CSV (the service's ?format=csv)")
    ls.set_defaults(func=_cmd_runs_list)
    show = rs.add_parser("show", parents=[common], help="one run with its recipe",
                         description="Show one run: state, outcome, last report and its recipe.")
    show.add_argument("id", type=_run_id, help="run id")
    show.add_argument("--json", action="store_true", help="print the run as JSON")
    show.set_defaults(func=_cmd_runs_show)


def register_studies(sub: argparse._SubParsersAction) -> None:
    common = _common()
    p = sub.add_parser("studies", help="list, show, create and delete studies on a largebatch service",
                       description="Studies on a largebatch service.")
    ss = p.add_subparsers(dest="studies_command", required=True, metavar="{list,show,create,delete}")
    ls = ss.add_parser("list", parents=[common], help="the studies, as a table",
                       description="List the studies of your namespace (oldest first).")
    ls.add_argument("--limit", type=_positive, default=100, help="page size (default: 100, at most 1000)")
    ls.add_argument("--offset", type=_nonnegative, default=0, help="skip this many studies")
    ls.add_argument("--json", action="store_true", help="print the page as JSON")
    ls.set_defaults(func=_cmd_studies_list)
    show = ss.add_parser("show", parents=[common], help="one study", description="Show one study.")
    show.add_argument("name", help="study name")
    show.add_argument("--json", action="store_true", help="print the study as JSON")
    show.set_defaults(func=_cmd_studies_show)
    create = ss.add_parser("create", parents=[common], help="create a study",
                           description="Create a study (a model whose runs teach the recipes).")
    create.add_argument("name", help="study name")
    create.add_argument("--model-params", type=_params, required=True, help="parameters of the model, e.g. 340M")
    create.add_argument("--family", choices=["transformer", "cnn", "other"], default="transformer",
                        help="model family: picks the priors (default: transformer)")
    create.add_argument("--metric", default="eval_loss", help="the final metric runs report (default: eval_loss)")
    create.add_argument("--direction", choices=["minimize", "maximize"], default="minimize",
                        help="whether a smaller or a larger metric is better (default: minimize)")
    create.add_argument("--json", action="store_true", help="print the study as JSON")
    create.set_defaults(func=_cmd_studies_create)
    delete = ss.add_parser("delete", parents=[common], help="delete a study and all its runs",
                           description="Delete a study and all its runs (asks first unless --yes).")
    delete.add_argument("name", help="study name")
    delete.add_argument("--yes", action="store_true", help="do not ask")
    delete.set_defaults(func=_cmd_studies_delete)


# ------------------------------------------------------------------------------------ handlers


def _call(args: argparse.Namespace, fn: Callable[[Client], Any]) -> Any:
    """Run ``fn`` with a client; every failure becomes one readable line."""
    try:
        client = Client(args.url, args.api_key, timeout=args.timeout, max_retries=2)
    except ValueError as e:
        raise CLIError(f"--url: {e}") from None
    try:
        with client:
            return fn(client)
    except errors.APIConnectionError as e:
        raise CLIError(e.message) from None  # it names the URL and what to check
    except errors.AuthenticationError as e:
        raise CLIError(f"{_detail(e)} (give --api-key or set LARGEBATCH_API_KEY)") from None
    except errors.APIStatusError as e:
        raise CLIError(_detail(e)) from None
    except errors.APIError as e:
        raise CLIError(str(e)) from None
    except ValueError as e:  # a malformed name or id, refused before sending
        raise CLIError(str(e)) from None


def _detail(e: errors.APIStatusError) -> str:
    detail = e.detail
    if isinstance(detail, list):
        detail = "; ".join(f"{'.'.join(str(x) for x in d.get('loc', ()))}: {d.get('msg')}" for d in detail)
    return f"{e.type or e.status_code}: {detail or e.message}"


def _cmd_runs_list(args: argparse.Namespace) -> int:
    if args.csv:
        print(_call(args, lambda c: c.list_runs_csv(args.study, state=args.state, batch_size=args.batch_size,
                                                    limit=args.limit, offset=args.offset)), end="")
        return 0
    page = _call(args, lambda c: c.list_runs(args.study, state=args.state, batch_size=args.batch_size,
                                             limit=args.limit, offset=args.offset))
    if args.json:
        print(page.model_dump_json(indent=2))
        return 0
    print(format_runs_table(page.items))
    print(_footer("run", len(page.items), page.total, page.offset))
    return 0


def _cmd_runs_show(args: argparse.Namespace) -> int:
    run = _call(args, lambda c: c.get_run(args.id))
    print(run.model_dump_json(indent=2) if args.json else format_run(run))
    return 0


def _cmd_studies_list(args: argparse.Namespace) -> int:
    page = _call(args, lambda c: c.list_studies(limit=args.limit, offset=args.offset))
    if args.json:
        print(page.model_dump_json(indent=2))
        return 0
    print(format_studies_table(page.items))
    print(_footer("study", len(page.items), page.total, page.offset))
    return 0


def _cmd_studies_show(args: argparse.Namespace) -> int:
    study = _call(args, lambda c: c.get_study(args.name))
    if args.json:
        print(study.model_dump_json(indent=2))
    else:
        print(_fields([("name", study.name), ("namespace", study.namespace), ("model", f"{study.model_family}, "
                       f"{study.model_params:,} parameters"), ("metric", f"{study.metric} ({study.direction})"),
                       ("runs", study.n_runs), ("created", _time(study.created_at))]))
    return 0


def _params(text: str) -> int:
    return parse_count(text, binary_k=False)


def _cmd_studies_create(args: argparse.Namespace) -> int:
    study = _call(args, lambda c: c.create_study(args.name, model_params=args.model_params,
                                                 model_family=args.family, metric=args.metric,
                                                 direction=args.direction))
    print(study.model_dump_json(indent=2) if args.json else f"created study {study.name} "
          f"({study.model_family}, {study.model_params:,} parameters; {study.metric}, {study.direction})")
    return 0


def _cmd_studies_delete(args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise CLIError(f"refusing to delete study {args.name!r} and its runs without --yes")
        if input(f"delete study {args.name!r} and all its runs? [y/N] ").strip().lower() not in ("y", "yes"):
            print("not deleted")
            return 1
    _call(args, lambda c: c.delete_study(args.name))
    print(f"deleted study {args.name}")
    return 0


# ------------------------------------------------------------------------------------ formatting


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _time(t: datetime | None) -> str:
    return "-" if t is None else t.strftime("%Y-%m-%d %H:%M:%S")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(header).rstrip(), "  ".join("-" * w for w in widths)] + [line(r).rstrip() for r in rows])


def _footer(noun: str, shown: int, total: int, offset: int) -> str:
    plural = "studies" if noun == "study" and total != 1 else (noun if total == 1 else noun + "s")
    if shown == 0:
        return f"no {plural}" if total == 0 else f"no {plural} at offset {offset} ({total} in all)"
    text = f"{offset + 1}-{offset + shown} of {total} {plural}"
    if offset + shown < total:
        text += f" (--offset {offset + shown} for more)"
    return text


def format_runs_table(runs: Sequence[Run]) -> str:
    header = ["id", "#", "state", "batch", "peak LR", "warmup", "const", "optimizer", "steps", "metric",
              "last step", "last loss", "updated"]
    rows = [[str(r.id), str(r.number), r.state, str(r.batch_size), _num(r.peak_lr), f"{r.warmup_ratio:.1%}",
             f"{r.const_ratio:.1%}", r.optimizer, f"{r.steps:,}", _num(r.metric),
             "-" if r.last_step is None else str(r.last_step), _num(r.last_loss), _time(r.updated_at)]
            for r in runs]
    return _table(header, rows, right={0, 1, 3, 4, 5, 6, 8, 9, 10, 11})


def format_studies_table(studies: Sequence[Study]) -> str:
    header = ["name", "family", "params", "metric", "direction", "runs", "created"]
    rows = [[s.name, s.model_family, f"{s.model_params:,}", s.metric, s.direction, str(s.n_runs),
             _time(s.created_at)] for s in studies]
    return _table(header, rows, right={2, 5})


def _fields(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in pairs)


def format_run(run: Run) -> str:
    pairs: list[tuple[str, Any]] = [
        ("run", f"{run.id} (#{run.number} of study {run.study}, namespace {run.namespace})"),
        ("state", run.state),
    ]
    if run.metric is not None:
        pairs.append(("metric", _num(run.metric)))
    if run.reason:
        pairs.append(("reason", run.reason))
    if run.diverged_step is not None:
        pairs.append(("diverged at", f"step {run.diverged_step}"))
    if run.last_step is not None:
        pairs.append(("last report", f"step {run.last_step}, loss {_num(run.last_loss)}"))
    pairs += [("created", _time(run.created_at)), ("updated", _time(run.updated_at))]
    if run.state == "running" and run.lease_expires_at is not None:
        pairs.append(("lease until", _time(run.lease_expires_at)))
    if run.environment:
        pairs.append(("environment", json.dumps(run.environment, sort_keys=True)))
    pairs.append(("recipe", run.recipe_hash[:12]))
    return _fields(pairs) + "\n\n" + format_recipe_table(run.recipe)
