"""The `largebatch` command line.

`recommend` lives here (it needs only the engine). Other packages add their own subcommands
(`serve`, `keys` from the service; `runs`, `studies` from the client) through the
``largebatch.commands`` entry-point group, so this module never imports them: each entry point is
a ``register(subparsers)`` function.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import get_args

from pydantic import ValidationError

from . import optimizers
from .engine import RecipeError, recommend
from .models import DecayShape, Recipe, RecommendationRequest, WeightDecayRule

_SUFFIX = {"": 1, "K": 1024, "M": 10**6, "B": 10**9, "G": 10**9}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMbBgG]?)\s*$")


_NEGATIVE_COUNT = re.compile(r"^-\d*\.?\d+(?:[eE][-+]?\d+)?[kKmMbBgG]?$")


class CLIError(Exception):
    """One readable line for the user; the CLI exits 2 with it."""


def parse_count(text: str, *, binary_k: bool = True) -> int:
    """'32K' -> 32768, '340M' -> 340_000_000, '1.5B' -> 1_500_000_000. K is 1024 for batch sizes
    (the papers' "32K" is 32768) and 1000 for parameter counts."""
    if text.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"must be a positive count, got {text!r}")
    m = _NUMBER.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (use e.g. 512, 32K, 340M, 1.5B)")
    suffix = m.group(2).upper()
    mult = _SUFFIX[suffix] if (suffix != "K" or binary_k) else 1000
    value = float(m.group(1)) * mult
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive count, got {text!r}")
    return int(value)


def _params(text: str) -> int:
    return parse_count(text, binary_k=False)


def _batch_or_auto(text: str) -> int | str:
    word = text.strip().lower()
    return word if word in ("auto", "ramp") else parse_count(text)


def _betas(text: str) -> list[float]:
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not two numbers: {text!r} (use e.g. 0.9,0.95)") from None
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"not two numbers: {text!r} (use e.g. 0.9,0.95)")
    return parts


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """States a default once: not for flags whose default is 'absent', nor where the help says it."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_recommend(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recommend", help="compute a large-batch recipe from a reference setup",
                       formatter_class=_HelpFormatter,
                       description="Compute a large-batch recipe. Flags cover the single-stage case; "
                                   "--request FILE.json takes any request (multi-stage included). Counts take "
                                   "suffixes: K is 1024 for batches and tokens (the papers' 32K is 32768) but 1000 "
                                   "for parameters (340M, 1.5B); M is 10^6 and B/G 10^9 everywhere.")
    p._negative_number_matcher = _NEGATIVE_COUNT  # "-1K" is a bad count, not an unknown flag
    p.add_argument("--request", type=Path, help="request JSON file ('-' for stdin); overrides the flags")
    p.add_argument("--model-params", type=_params, help="parameter count, e.g. 340M")
    p.add_argument("--family", choices=["transformer", "cnn", "other"], default="transformer",
                   help="model family: picks the priors (\"other\" has no cap prior)")
    p.add_argument("--ref-batch", type=parse_count, help="reference batch size, e.g. 512")
    p.add_argument("--ref-lr", type=float, help="reference peak LR, e.g. 6.25e-4")
    p.add_argument("--ref-optimizer", default="lamb", choices=optimizers.REFERENCE_NAMES,
                   help="optimizer of the reference run")
    p.add_argument("--ref-warmup", type=float, help="reference warmup ratio, e.g. 0.003125")
    p.add_argument("--ref-warmup-steps", type=parse_count, help="reference warmup steps (instead of a ratio)")
    p.add_argument("--ref-steps", type=parse_count, help="reference total steps, e.g. 1M")
    p.add_argument("--ref-batch-tokens", type=parse_count, help="reference batch in tokens (instead of --ref-batch)")
    p.add_argument("--ref-seq-len", type=parse_count, help="reference sequence length in tokens")
    p.add_argument("--ref-model-params", type=_params, help="size of the model the reference ran on (default: this one)")
    p.add_argument("--ref-betas", type=_betas, help="reference Adam betas, e.g. 0.9,0.95 (kept by the recipe)")
    p.add_argument("--ref-eps", type=float, help="reference optimizer epsilon (kept by the recipe)")
    p.add_argument("--ref-weight-decay", type=float, help="reference weight decay (kept by the recipe)")
    p.add_argument("--ref-decay", choices=get_args(DecayShape), help="reference decay shape")
    p.add_argument("--decay", choices=get_args(DecayShape), help="the recipe's decay shape (default: the reference's)")
    p.add_argument("--width", type=parse_count, help="hidden width of this model (muP-style LR transfer)")
    p.add_argument("--ref-width", type=parse_count, help="hidden width of the model the reference ran on")
    p.add_argument("--shared-weights", action="store_true", help="the model reuses weights across layers")
    p.add_argument("--tokens", type=float, help="training budget in tokens (critical-batch prior; 'auto' batch)")
    p.add_argument("--compute", type=float, help="training budget in FLOPs (with --target-batch auto)")
    p.add_argument("--weight-decay-rule", choices=get_args(WeightDecayRule),
                   help="keep the reference weight decay, or keep AdamW's timescale 1/(lr x wd) fixed in examples")
    p.add_argument("--noise-scale", type=float, help="measured gradient noise scale B_noise (in sequences)")
    p.add_argument("--target-batch", type=_batch_or_auto, help="target batch size, e.g. 32K, or 'auto' (needs "
                   "--noise-scale), or 'ramp' (a batch-size warmup; needs reference.noise_trajectory, so --request)")
    p.add_argument("--max-overhead", type=float, help="examples overhead E(B)/E_min - 1 that 'auto' accepts "
                   "(default 0.2, Zhang et al. 2024's critical batch)")
    p.add_argument("--target-batch-tokens", type=parse_count, help="target batch in tokens (instead of --target-batch)")
    p.add_argument("--seq-len", type=parse_count, help="target sequence length (default: the reference's)")
    p.add_argument("--adam-hparams", choices=["keep", "sde"], help="keep the reference betas/eps (default) or apply "
                   "the SDE rule (Malladi et al. 2022)")
    p.add_argument("--target-steps", type=parse_count, help="explicit step budget at the target batch")
    p.add_argument("--rule", choices=["sqrt", "linear"], help="LR scaling rule (default: by optimizer)")
    p.add_argument("--budget", choices=["same-epochs", "same-steps", "same-loss"], default="same-epochs",
                   help="same examples, same steps, or the examples B_noise predicts for the same loss")
    p.add_argument("--lr-cap", type=float, help="largest stable LR, if known")
    p.add_argument("--optimizer", choices=optimizers.RECIPE_NAMES, help="force an optimizer")
    p.add_argument("--json", action="store_true", help="print the recipe as JSON")
    p.add_argument("--plot", type=Path, help="write the LR-over-steps plot (.png, .svg or .pdf, by the suffix)")
    p.set_defaults(func=_cmd_recommend)


def _request_from_args(args: argparse.Namespace) -> dict:
    if args.request is not None:
        text = sys.stdin.read() if str(args.request) == "-" else _read(args.request)
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise CLIError(f"--request: not valid JSON: {e}") from None
    def either(a, b):
        return a if a is not None else b

    missing = [flag for flag, v in [("--model-params", args.model_params),
                                    ("--ref-batch", either(args.ref_batch, args.ref_batch_tokens)),
                                    ("--ref-lr", args.ref_lr), ("--ref-steps", either(args.ref_steps, args.target_steps)),
                                    ("--target-batch", either(args.target_batch, args.target_batch_tokens))]
               if v is None]
    if missing:
        raise CLIError(f"missing {', '.join(missing)} (or give --request FILE.json)")
    ref: dict = {"lr": args.ref_lr, "optimizer": args.ref_optimizer}
    for key, value in [("batch_size", args.ref_batch), ("batch_tokens", args.ref_batch_tokens),
                       ("seq_len", args.ref_seq_len), ("steps", args.ref_steps),
                       ("warmup_ratio", args.ref_warmup), ("warmup_steps", args.ref_warmup_steps),
                       ("model_params", args.ref_model_params), ("betas", args.ref_betas), ("eps", args.ref_eps),
                       ("weight_decay", args.ref_weight_decay), ("decay", args.ref_decay),
                       ("noise_scale", args.noise_scale), ("model_width", args.ref_width)]:
        if value is not None:
            ref[key] = value
    target: dict = {}
    for key, value in [("batch_size", args.target_batch), ("batch_tokens", args.target_batch_tokens),
                       ("seq_len", args.seq_len), ("steps", args.target_steps), ("tokens", args.tokens),
                       ("compute", args.compute), ("max_overhead", args.max_overhead)]:
        if value is not None:
            target[key] = value
    model: dict = {"params": args.model_params, "family": args.family}
    if args.width is not None:
        model["width"] = args.width
    if args.shared_weights:
        model["shared_weights"] = True
    req: dict = {"model": model, "reference": ref, "target": target, "budget": args.budget}
    for key in ("rule", "lr_cap", "optimizer", "adam_hparams", "decay", "weight_decay_rule"):
        if getattr(args, key) is not None:
            req[key] = getattr(args, key)
    return req


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise CLIError(f"cannot read {path}: {e.strerror}") from None


def format_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid request: " + "; ".join(parts)


def format_recipe_table(recipe: Recipe) -> str:
    o = recipe.optimizer
    lines = [f"optimizer   {o.name}  (betas {o.betas}, eps {o.eps:g}, weight decay {o.weight_decay:g})",
             f"total steps {recipe.total_steps:,}", ""]
    header = f"{'stage':>5} {'batch':>8} {'steps':>9} {'peak LR':>11} {'warmup':>15} {'const':>15} {'decay':>9}"
    lines += [header, "-" * len(header)]
    for i, s in enumerate(recipe.stages, 1):
        lines.append(f"{i:>5} {s.batch_size:>8} {s.steps:>9,} {s.peak_lr:>11.6g} "
                     f"{s.warmup_steps:>7,} ({s.warmup_ratio:>5.1%}) {s.const_steps:>7,} ({s.const_ratio:>5.1%}) "
                     f"{s.decay_steps:>9,}")
    lines += ["", "why:"] + [f"  - {r}" for r in recipe.rationale]
    if recipe.warnings:
        lines += ["", "warnings:"] + [f"  ! {w}" for w in recipe.warnings]
    return "\n".join(lines)


def _cmd_recommend(args: argparse.Namespace) -> int:
    try:
        recipe = recommend(RecommendationRequest.model_validate(_request_from_args(args)))
    except ValidationError as e:
        raise CLIError(format_validation_error(e)) from None
    except RecipeError as e:
        raise CLIError(str(e)) from None
    if args.plot is not None:
        from .plot import render_schedule

        fmt = args.plot.suffix.lower().lstrip(".")
        if fmt not in ("png", "svg", "pdf"):
            raise CLIError(f"--plot {args.plot}: the suffix must be .png, .svg or .pdf")
        try:
            args.plot.write_bytes(render_schedule(recipe, fmt))  # type: ignore[arg-type]
        except OSError as e:
            raise CLIError(f"cannot write {args.plot}: {e.strerror}") from None
        print(f"plot written to {args.plot.resolve()}", file=sys.stderr)
    print(recipe.model_dump_json(indent=2) if args.json else format_recipe_table(recipe))
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one readable line (the full usage is one `--help` away)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="largebatch", description="Large-batch training recipes (LAMB/LANS).")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_recommend(sub)
    for ep in sorted(entry_points(group="largebatch.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except (ImportError, AttributeError):  # that part (or its extra) is absent: so are its commands
            continue
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"largebatch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run as a script this module is __main__, with a CLIError class of its own that the installed
    # module's commands do not raise: go through the installed module's main.
    from largebatch.scaling_rules.cli import main as _main

    sys.exit(_main())
