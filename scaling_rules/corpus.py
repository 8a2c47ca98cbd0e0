"""The published-recipe corpus (``corpus.csv``): recipes from papers and public code as data, and an
honest score of the engine on them.

Each row is one published number: its source, an exact locator (table, section, or file and line of
public code), the inputs a practitioner would type (model, reference recipe, target batch, and the
token budget where the source states it), the published answer and the quantity it measures. Bands are fixed per quantity from the sources' own
scatter before the engine runs (``BANDS``); seed rows (the tables the engine was built from) are
scored exactly; rows that only check arithmetic (an invented B_noise, a library's formula) are
labelled ``arithmetic`` and are not counted as predictions.

Every constant fitted on the corpus is scored by leave-one-source-out cross-validation: the source
under test is left out of the fit, the engine's constant is set to that fit while the source's rows
are scored, then restored. The fitted constants are the size law at a fixed batch
(``fit_size_exponent``, the engine's ``priors.SIZE_EXPONENT``) and the scale of the critical-batch prior
from a token budget (``fit_critical_scale``, ``priors.CRITICAL_BATCH_SCALE``), refit in that order, and
the batch past which LARS warmup grows (``fit_lars_warmup_batch``, ``priors.LARS_WARMUP_BATCH``). Evidence the engine took from a
corpus source (a divergence that sets an LR cap) is left out the same way (``EVIDENCE``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from importlib import resources

from . import priors
from .engine import recommend
from .models import Recipe

__all__ = ["BANDS", "EVIDENCE", "KINDS", "Result", "Row", "critical_scale", "engine_size_exponent",
           "fit_critical_scale", "fit_lars_warmup_batch", "fit_size_exponent", "lars_warmup_batch",
           "leave_one_source_out", "load", "score", "size_exponent", "size_law_cv", "summary", "without_evidence"]

# Widest band per quantity, from the sources' scatter: tuned LRs of one recipe family sit within
# x/÷1.5 of each other (GPT-3's and Pythia's LRs around their own size trend), warmups within x/÷2
# (constant-token vs constant-step conventions), measured example counts within 25%.
BANDS = {"lr": 1.5, "warmup": 2.0, "examples_ratio": 0.25}
# Seed rows: LRs to rounding error, warmup and constant phases to the whole step.
EXACT = {"lr": 1e-9, "warmup": 1e-3, "const": 1e-3, "examples_ratio": 1e-9}
KINDS = ("prediction", "seed", "arithmetic")
FACTOR_QUANTITIES = frozenset({"lr", "warmup"})  # banded as a factor; examples_ratio as a relative error
WARMUP_UNITS = frozenset({"steps", "samples", "tokens", "epochs", "ratio"})
# The priors constants the size-law fit and the critical-batch fit feed.
SIZE_CONSTANT = "SIZE_EXPONENT"
CRITICAL_CONSTANT = "CRITICAL_BATCH_SCALE"
LARS_CONSTANT = "LARS_WARMUP_BATCH"


def _num(text: str) -> int | float | None:
    if text == "":
        return None
    value = json.loads(text)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"expected a number, got {text!r}")
    return value


@dataclass(frozen=True)
class Row:
    id: str
    source: str
    locator: str
    kind: str
    rule: str
    quantity: str
    published: float
    unit: str
    band: str
    family: str
    params: int
    ref_params: int | None
    ref_optimizer: str
    optimizer: str
    batch_unit: str
    ref_batch: int
    ref_seq_len: int | None
    ref_lr: float
    ref_warmup_steps: int | None
    ref_steps: int | None
    target_batch: int
    seq_len: int | None
    epoch_size: int | None
    extra: str
    note: str

    @classmethod
    def parse(cls, d: dict[str, str]) -> Row:
        nums = {k: _num(d[k]) for k in ("published", "params", "ref_params", "ref_batch", "ref_seq_len", "ref_lr",
                                        "ref_warmup_steps", "ref_steps", "target_batch", "seq_len", "epoch_size")}
        row = cls(**{**d, **nums})  # type: ignore[arg-type]
        row.check()
        return row

    def check(self) -> None:
        """Refuse a malformed row, naming it and the field."""
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"corpus row {self.id!r}: {field} {why}")

        if self.kind not in KINDS:
            raise bad("kind", f"must be one of {KINDS}, got {self.kind!r}")
        if not self.source or not self.locator:
            raise bad("locator", "is required (table, section, or file and line)")
        if self.quantity not in (*BANDS, "const"):
            raise bad("quantity", f"unknown: {self.quantity!r}")
        if self.quantity in ("warmup", "const") and self.unit not in WARMUP_UNITS:
            raise bad("unit", f"must be one of {sorted(WARMUP_UNITS)} for {self.quantity}, got {self.unit!r}")
        if self.unit == "epochs" and not self.epoch_size:
            raise bad("epoch_size", "is required for a warmup in epochs")
        if self.batch_unit not in ("sequences", "tokens", "images"):
            raise bad("batch_unit", f"unknown: {self.batch_unit!r}")
        if self.batch_unit == "tokens" and not (self.ref_seq_len and self.seq_len):
            raise bad("seq_len", "is required when batches are counted in tokens")
        if not (isinstance(self.published, int | float) and self.published > 0):
            raise bad("published", "must be a positive number")
        if self.quantity not in BANDS and (self.band != "exact" or self.kind == "prediction"):
            raise bad("quantity", f"{self.quantity} is checked exactly on seed rows only, not predicted")
        if self.band != "exact" and self.tolerance > BANDS[self.quantity]:
            raise bad("band", f"{self.band} is wider than the {self.quantity} band fixed before scoring "
                              f"({BANDS[self.quantity]:g})")
        if self.kind == "prediction" and self.band != f"{BANDS[self.quantity]:g}":
            raise bad("band", f"a prediction is scored with its quantity's band ({BANDS[self.quantity]:g}), "
                              f"got {self.band!r}")

    @property
    def tolerance(self) -> float:
        """The row's band: a factor (LR, warmup) or a relative error (examples ratio, exact rows)."""
        if self.band == "exact":
            return EXACT[self.quantity]
        if self.quantity == "const":
            raise ValueError(f"corpus row {self.id!r}: band of a constant phase must be exact")
        return float(self.band)

    @property
    def is_factor_band(self) -> bool:
        return self.band != "exact" and self.quantity in FACTOR_QUANTITIES

    def request(self) -> dict:
        """The request a practitioner would send for this row."""
        ref: dict = {"lr": self.ref_lr, "optimizer": self.ref_optimizer}
        if self.ref_steps is not None:
            ref["steps"] = self.ref_steps
        if self.batch_unit == "tokens":
            ref.update(batch_tokens=self.ref_batch, seq_len=self.ref_seq_len)
            target: dict = {"batch_tokens": self.target_batch, "seq_len": self.seq_len}
        else:
            ref["batch_size"] = self.ref_batch
            if self.ref_seq_len is not None:
                ref["seq_len"] = self.ref_seq_len
            target = {"batch_size": self.target_batch}
            if self.seq_len is not None:
                target["seq_len"] = self.seq_len
        if self.ref_warmup_steps is not None:
            ref["warmup_steps"] = self.ref_warmup_steps
        if self.ref_params is not None:
            ref["model_params"] = self.ref_params
        req: dict = {"model": {"params": self.params, "family": self.family}, "reference": ref, "target": target}
        if self.optimizer:
            req["optimizer"] = self.optimizer
        stage: dict = {}
        for item in filter(None, self.extra.split(";")):
            key, _, raw = item.partition("=")
            value = json.loads(raw) if raw[:1] in "-0123456789[{\"" else raw
            *path, leaf = key.strip().split(".")
            node = stage if path[:1] == ["stage"] else req
            for part in path[1:] if path[:1] == ["stage"] else path:
                node = node.setdefault(part, {})
            node[leaf] = value
        if stage:  # a one-stage request (LANS-style stage inputs: explicit steps, cap, plateau)
            req["stages"] = [{**req.pop("target"), "reference": req.pop("reference"), **stage}]
        return req

    def value(self, recipe: Recipe) -> float:
        """The engine's answer, in the row's quantity and unit."""
        s = recipe.stages[0]
        if self.quantity == "lr":
            return s.peak_lr
        if self.quantity == "examples_ratio":
            return math.nan if s.examples_ratio is None else s.examples_ratio
        steps = s.warmup_steps if self.quantity == "warmup" else s.const_steps
        if self.unit == "steps":
            return steps
        if self.unit == "ratio":
            return steps / s.steps
        samples = steps * s.batch_size
        if self.unit == "samples":
            return samples
        if self.unit == "tokens":
            return samples * (s.seq_len or self.seq_len or 1)
        return samples / self.epoch_size  # type: ignore[operator]

    def within(self, got: float) -> bool:
        if not math.isfinite(got) or got <= 0:
            return False
        if self.is_factor_band:
            return self.published / self.tolerance * (1 - 1e-12) <= got <= self.published * self.tolerance * (1 + 1e-12)
        return abs(got - self.published) <= self.tolerance * self.published


def load(path: str | None = None) -> list[Row]:
    """The corpus rows (``corpus.csv`` next to this module unless ``path`` is given)."""
    if path is None:
        text = resources.files(__package__).joinpath("corpus.csv").read_text(encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    rows = [Row.parse(d) for d in csv.DictReader(text.splitlines())]
    ids = [r.id for r in rows]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"corpus: duplicate row ids {dupes}")
    return rows


@dataclass(frozen=True)
class Result:
    row: Row
    got: float
    within: bool
    error: str = ""  # the engine's refusal, when it refused the request

    @property
    def log_error(self) -> float:
        """|ln(engine / published)|; inf when the engine gave no answer."""
        if not (math.isfinite(self.got) and self.got > 0):
            return math.inf
        return abs(math.log(self.got / self.row.published))


def score(rows: Iterable[Row]) -> list[Result]:
    out = []
    for row in rows:
        try:
            got = row.value(recommend(row.request()))
        except (ValueError, ArithmeticError) as e:  # a refusal is a miss, not a crash
            out.append(Result(row, math.nan, False, f"{type(e).__name__}: {e}"))
            continue
        out.append(Result(row, got, row.within(got)))
    return out


# ------------------------------------------------------------------------------ the size law


def _size_groups(rows: Iterable[Row]) -> dict[tuple[str, int], set[tuple[float, float]]]:
    """(source, batch) -> {(ln N, ln LR)}: each source's models trained at one batch, with the reference."""
    groups: dict[tuple[str, int], set[tuple[float, float]]] = {}
    for r in rows:
        if r.rule != "size" or r.quantity != "lr" or r.kind != "prediction" or r.ref_params is None:
            continue
        g = groups.setdefault((r.source, r.ref_batch), set())
        g.add((math.log(r.ref_params), math.log(r.ref_lr)))
        g.add((math.log(r.params), math.log(r.published)))
    return groups


def fit_size_exponent(rows: Iterable[Row]) -> float:
    """Exponent a of LR ~ N^a at a fixed batch: least squares with one intercept per (source, batch)
    group, so each family's own LR level cancels and only its trend in N counts."""
    sxy = sxx = 0.0
    for points in _size_groups(rows).values():
        if len(points) < 2:
            continue
        mx = sum(x for x, _ in points) / len(points)
        my = sum(y for _, y in points) / len(points)
        sxy += sum((x - mx) * (y - my) for x, y in points)
        sxx += sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        raise ValueError("fit_size_exponent: no source with two model sizes at one batch")
    return sxy / sxx


def size_law_cv(rows: list[Row]) -> tuple[float, dict[str, tuple[float, float]]]:
    """The fit on every source, and per source (family) left out: (its fit without it, the mean
    |ln error| of its own size rows predicted with that fit from its own reference)."""
    fit = fit_size_exponent(rows)
    per: dict[str, tuple[float, float]] = {}
    for source in sorted({r.source for r in rows if (r.source, r.ref_batch) in _size_groups([r])}):
        a = fit_size_exponent([r for r in rows if r.source != source])
        own = [r for r in rows if r.source == source and (r.source, r.ref_batch) in _size_groups([r])]
        errs = [abs(math.log(r.ref_lr * (r.params / r.ref_params) ** a / r.published)) for r in own]  # type: ignore[operator]
        per[source] = (a, sum(errs) / len(errs))
    return fit, per


_PROBE = {"model": {"params": 1_250_000_000, "family": "transformer"}, "optimizer": "adamw",
          "reference": {"batch_tokens": 2**19, "seq_len": 2048, "lr": 6e-4, "optimizer": "adamw", "warmup_steps": 715,
                        "steps": 572_205, "model_params": 125_000_000},
          "target": {"batch_tokens": 2**19, "seq_len": 2048}}


def engine_size_exponent() -> float:
    """The engine's LR exponent in N at a fixed batch, measured through ``recommend`` (AdamW, GPT-3
    Small's recipe moved to a 10x larger model at the same batch and tokens)."""
    big = recommend(_PROBE).stages[0].peak_lr
    same = recommend({**_PROBE, "model": {**_PROBE["model"], "params": 125_000_000}}).stages[0].peak_lr
    return math.log(big / same) / math.log(10)


@contextmanager
def size_exponent(value: float) -> Iterator[None]:
    """Run the engine with its fixed-batch size exponent set to ``value`` (restored after).

    The engine may derive the fixed-batch exponent from ``priors.SIZE_EXPONENT`` plus an offset (a
    batch-path term), so the constant is shifted by the difference measured through ``recommend``.
    It patches the module for the whole process: for scoring, not for a server answering requests."""
    old = getattr(priors, SIZE_CONSTANT)
    shift = value - engine_size_exponent()
    setattr(priors, SIZE_CONSTANT, old + shift)
    try:
        got = engine_size_exponent()
        if abs(got - value) > 1e-6:
            raise RuntimeError(f"the engine's size law does not follow priors.{SIZE_CONSTANT}: "
                               f"set to give N^{value:.4f}, measured N^{got:.4f}")
        yield
    finally:
        setattr(priors, SIZE_CONSTANT, old)


# The engine's LR caps that rest on one corpus source's divergences: (family, optimizer) priors whose
# cap that source set. Scoring the source's own rows, the engine knows no such cap.
EVIDENCE: dict[str, tuple[tuple[str, str], ...]] = {
    # LANS Figure 1 / section 3.3: the sqrt-scaled 0.01 diverged, 0.007 trained (the layer-wise cap).
    "LANS (Zheng et al. 2020)": (("transformer", "lamb"), ("transformer", "lans")),
    # LAMB Table 8: AdamW's divergences at 16K (the warmup-aware AdamW cap).
    "LAMB (You et al. 2020)": (("transformer", "adamw"), ("transformer", "adam")),
}


@contextmanager
def without_evidence(source: str) -> Iterator[None]:
    """Run the engine without the caps ``source``'s divergences set (restored after)."""
    keys = [k for k in EVIDENCE.get(source, ()) if k in priors.PRIORS]
    old = {k: priors.PRIORS[k] for k in keys}
    for k in keys:
        priors.PRIORS[k] = dataclasses.replace(old[k], cap=None)
    try:
        yield
    finally:
        priors.PRIORS.update(old)


# ------------------------------------------------------------------------------ the critical-batch scale


def _budget_batch_rows(rows: Iterable[Row]) -> list[Row]:
    """LR predictions whose batch changes under a stated token budget: where the critical-batch prior
    (``priors.critical_batch_prior_tokens``) bends the batch factor."""
    out = []
    for r in rows:
        if r.kind != "prediction" or r.quantity != "lr" or "tokens" not in r.request().get("target", {}):
            continue
        if r.ref_batch * (r.ref_seq_len or 1) != r.target_batch * (r.seq_len or 1):
            out.append(r)
    return out


@contextmanager
def _priors_set(name: str, value: float) -> Iterator[None]:
    """``priors.<name>`` set to ``value`` for the block, then restored (the whole process: for scoring)."""
    old = getattr(priors, name)
    setattr(priors, name, value)
    try:
        yield
    finally:
        setattr(priors, name, old)


def critical_scale(value: float) -> AbstractContextManager:
    """Run the engine with its critical-batch prior scaled by ``value`` (restored after); for scoring,
    like :func:`size_exponent`."""
    return _priors_set(CRITICAL_CONSTANT, value)


def fit_critical_scale(rows: Iterable[Row]) -> float:
    """The scale of the critical-batch prior (B_noise = scale x Step Law's B_opt) that minimises the
    squared ln error of the LR predictions it bends, the engine's other constants as they stand: a
    golden-section search over log10 scale in [-3, 1] (the error is flat below the fit, where every
    such batch is past B_noise, and grows above it)."""
    sel = _budget_batch_rows(rows)
    if not sel:
        raise ValueError("fit_critical_scale: no LR prediction whose batch changes under a token budget")
    return 10.0 ** _golden(lambda x: _sse(sel, critical_scale(10.0**x)), -3.0, 1.0)


def _sse(rows: list[Row], setting: AbstractContextManager) -> float:
    with setting:
        return sum(r.log_error**2 for r in score(rows))


def _golden(f: Callable[[float], float], lo: float, hi: float, tol: float = 0.005) -> float:
    """The minimiser of a unimodal ``f`` on [lo, hi] (golden-section search)."""
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    return (lo + hi) / 2


# ------------------------------------------------------------------------------ the LARS warmup


def _lars_warmup_rows(rows: Iterable[Row]) -> list[Row]:
    return [r for r in rows if r.kind == "prediction" and r.quantity == "warmup" and (r.optimizer or r.ref_optimizer) == "lars"]


def lars_warmup_batch(value: float) -> AbstractContextManager:
    """Run the engine with its LARS warmup-growth batch set to ``value`` (restored after)."""
    return _priors_set(LARS_CONSTANT, value)


def fit_lars_warmup_batch(rows: Iterable[Row]) -> float:
    """The batch past which LARS warmup epochs grow (``priors.LARS_WARMUP_BATCH``): least squares in
    ln warmup over the corpus's LARS warmups, searched over log2 batch in [8, 24]."""
    sel = _lars_warmup_rows(rows)
    if not sel:
        raise ValueError("fit_lars_warmup_batch: no LARS warmup prediction")
    return 2.0 ** _golden(lambda x: _sse(sel, lars_warmup_batch(2.0**x)), 8.0, 24.0)


def leave_one_source_out(rows: list[Row]) -> list[Result]:
    """Every row scored with the engine's fitted constants refit, and its evidence dropped, without
    the row's source: the size law first, then the critical-batch scale with that size law."""
    out: list[Result] = []
    for source in dict.fromkeys(r.source for r in rows):
        held = [r for r in rows if r.source == source]
        rest = [r for r in rows if r.source != source]
        with size_exponent(fit_size_exponent(rest)), without_evidence(source):
            with critical_scale(fit_critical_scale(rest)), lars_warmup_batch(fit_lars_warmup_batch(rest)):
                out.extend(score(held))
    order = {r.id: i for i, r in enumerate(rows)}
    return sorted(out, key=lambda res: order[res.row.id])


# ------------------------------------------------------------------------------ the summary


@dataclass(frozen=True)
class Line:
    rule: str
    quantity: str
    rows: int
    within: int
    within_cv: int
    median_cv_error: float  # ln factor; exp() of it is the typical "x" error under LOSO

    @property
    def fraction(self) -> float:
        return self.within / self.rows

    @property
    def fraction_cv(self) -> float:
        return self.within_cv / self.rows


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return math.nan if not n else (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2)


def summary(results: list[Result], cv: list[Result], kind: str = "prediction") -> list[Line]:
    """Per (rule, quantity) among rows of ``kind``, plus an "all" line: rows, within band with the
    engine as shipped, within band and median error under leave-one-source-out."""
    cv_by_id = {r.row.id: r for r in cv}
    keys = list(dict.fromkeys((r.row.rule, r.row.quantity) for r in results if r.row.kind == kind))
    lines = []
    for key in [*keys, ("all", "all")]:
        sel = [r for r in results if r.row.kind == kind and (key == ("all", "all") or (r.row.rule, r.row.quantity) == key)]
        if not sel:
            continue
        cvs = [cv_by_id[r.row.id] for r in sel]
        lines.append(Line(key[0], key[1], len(sel), sum(r.within for r in sel), sum(r.within for r in cvs),
                          _median([r.log_error for r in cvs])))
    return lines
