"""The published corpus (scaling_rules/corpus.csv) and the engine's score on it: enough rows from
enough sources, every row located, bands no wider than fixed before scoring, seeds exact, arithmetic
rows not counted, and the within-band fraction held above a floor, as shipped and under
leave-one-source-out cross-validation of the size law."""

import csv
import io
import math

import pytest

from largebatch.scaling_rules import RecommendationRequest, corpus, priors, recommend
from largebatch.scaling_rules.corpus import BANDS, Row

# Measured with the critical-batch prior's scale and the LARS warmup growth fitted
# (priors.CRITICAL_BATCH_SCALE, priors.LARS_WARMUP_BATCH) and Llama 3's reference LR as its locator
# states: 89 of 113 predictions within band (78.8%), 86 of 113 under leave-one-source-out (76.1%). Engine v3 as it landed (949d8db): 78 and 75. Engine v2 (240fcbe), on
# the 108 rows it could read then (no target.tokens, no examples rows) and with the size law alone
# cross-validated, scored 68 and 60. Raise these as the engine improves; never widen a row's band to
# absorb an error.
FLOOR = 0.78
FLOOR_CV = 0.76


@pytest.fixture(scope="module")
def rows():
    return corpus.load()


@pytest.fixture(scope="module")
def scored(rows):
    return corpus.score(rows), corpus.leave_one_source_out(rows)


def test_at_least_100_rows_from_25_sources(rows):
    predictions = [r for r in rows if r.kind == "prediction"]
    assert len(rows) >= 100 and len({r.source for r in rows}) >= 25
    assert len(predictions) >= 100 and len({r.source for r in predictions}) >= 25


def test_every_row_is_located_and_parses(rows):
    for r in rows:
        assert r.source and len(r.locator) >= 10, r.id
        RecommendationRequest.model_validate(r.request())


def test_bands_are_the_fixed_ones(rows):
    for r in rows:
        if r.band == "exact":
            assert r.kind != "prediction", r.id
            continue
        assert r.tolerance <= BANDS[r.quantity], r.id
        if r.kind == "prediction":
            assert r.tolerance == BANDS[r.quantity], r.id
    assert BANDS == {"lr": 1.5, "warmup": 2.0, "examples_ratio": 0.25}


def _one_row_csv(**change) -> str:
    src = corpus.load()[0]
    fields = list(Row.__dataclass_fields__)
    values = {f: "" if getattr(src, f) is None else str(getattr(src, f)) for f in fields}
    values.update(change)
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerow(values)
    return out.getvalue()


@pytest.mark.parametrize(("change", "field"), [
    ({"kind": "prediction", "band": "1.6"}, "band"),  # wider than the LR band
    ({"kind": "arithmetic", "band": "1.6"}, "band"),
    ({"kind": "prediction", "band": "1.2"}, "band"),  # a prediction uses its quantity's band
    ({"kind": "prediction", "quantity": "warmup", "unit": "steps", "band": "3"}, "band"),
    ({"locator": ""}, "locator"),
    ({"kind": "guess"}, "kind"),
    ({"quantity": "warmup", "unit": "minutes"}, "unit"),
])
def test_a_bad_row_is_refused_by_name(tmp_path, change, field):
    path = tmp_path / "corpus.csv"
    path.write_text(_one_row_csv(**change))
    with pytest.raises(ValueError, match=rf"corpus row 'lamb-t4-1k': {field}"):
        corpus.load(str(path))


def test_seeds_are_exact(scored):
    results, _ = scored
    seeds = [r for r in results if r.row.kind == "seed"]
    assert len(seeds) >= 20
    assert {r.row.source for r in seeds} >= {"LAMB (You et al. 2020)", "LANS (Zheng et al. 2020)",
                                             "NVIDIA BERT (run_pretraining.sh)"}
    out = [(r.row.id, r.row.published, r.got) for r in seeds if not r.within]
    assert not out, out


def test_arithmetic_rows_are_not_predictions(rows, scored):
    results, cv = scored
    (total,) = [line for line in corpus.summary(results, cv) if line.rule == "all"]
    assert total.rows == sum(r.kind == "prediction" for r in rows)
    assert any(r.kind == "arithmetic" for r in rows)
    assert {line.rule for line in corpus.summary(results, cv, "arithmetic")} >= {"noise"}


def test_the_engine_answers_every_row(scored):
    results, cv = scored
    refused = [(r.row.id, r.error) for r in results + cv if r.error]
    assert not refused, refused


def test_within_band_overall_and_leave_one_source_out(scored):
    results, cv = scored
    (total,) = [line for line in corpus.summary(results, cv) if line.rule == "all"]
    assert total.rows >= 100
    assert total.fraction >= FLOOR, f"{total.within} of {total.rows} within band"
    assert total.fraction_cv >= FLOOR_CV, f"{total.within_cv} of {total.rows} within band under LOSO"


def test_size_law_fit_and_its_leave_one_family_out_error(rows):
    fit, per = corpus.size_law_cv(rows)
    assert -0.40 < fit < -0.30  # published LLM families at a fixed batch fit about N^-0.35
    assert len(per) >= 8
    for family, (a, err) in per.items():
        assert abs(a - fit) < 0.05, family  # no one family carries the fit
        assert err < math.log(2.0), family  # and it predicts each left-out family within x2 on average


def test_leave_one_source_out_moves_only_the_rows_its_fits_and_evidence_touch(rows, scored):
    results, cv = scored
    by_id = {r.row.id: r for r in cv}
    fitted = {r.id for r in corpus._budget_batch_rows(rows) + corpus._lars_warmup_rows(rows)}
    for r in results:
        if (r.row.ref_params is None or r.row.ref_params == r.row.params) and r.row.source not in corpus.EVIDENCE \
                and r.row.id not in fitted:
            assert by_id[r.row.id].got == pytest.approx(r.got, rel=1e-12, nan_ok=True), r.row.id
    moved = [r for r in results if r.row.rule == "size" and r.row.quantity == "lr"
             and by_id[r.row.id].got != pytest.approx(r.got, rel=1e-9)]
    assert moved  # the held-out fit differs from the engine's constant, and the engine follows it
    # LANS's own row is scored without the cap LANS's divergence set: the uncapped regime rule.
    lans = next(r for r in results if r.row.id == "lans-pred")
    assert lans.got == pytest.approx(0.007) and by_id["lans-pred"].got > lans.got


def test_without_evidence_drops_the_cap_and_restores_it():
    req = next(r for r in corpus.load() if r.id == "lans-pred").request()
    capped = recommend(req).stages[0]
    before = dict(priors.PRIORS)
    with corpus.without_evidence("LANS (Zheng et al. 2020)"):
        free = recommend(req).stages[0]
    assert free.peak_lr > capped.peak_lr and free.lr_cap is None
    assert priors.PRIORS == before and recommend(req).stages[0].peak_lr == capped.peak_lr


def test_size_exponent_override_reaches_the_engine_and_is_restored():
    before, constant = corpus.engine_size_exponent(), getattr(priors, corpus.SIZE_CONSTANT)
    with corpus.size_exponent(-0.25):
        assert corpus.engine_size_exponent() == pytest.approx(-0.25, abs=1e-9)
    assert getattr(priors, corpus.SIZE_CONSTANT) == constant
    assert corpus.engine_size_exponent() == before


def test_engine_size_exponent_is_the_corpus_fit(rows):
    # The engine's constant is the corpus's fit to two decimals (the fit moves by up to 0.05 when a
    # family is left out, so more digits would be noise).
    assert corpus.engine_size_exponent() == pytest.approx(round(corpus.fit_size_exponent(rows), 2), abs=0.005)


def test_critical_scale_is_the_corpus_fit_and_stable_when_a_source_is_left_out(rows):
    fit = corpus.fit_critical_scale(rows)
    assert abs(math.log(priors.CRITICAL_BATCH_SCALE / fit)) < 0.05  # the engine's constant is the fit
    fitted_on = {r.source for r in corpus._budget_batch_rows(rows)}
    assert len(fitted_on) >= 8
    for source in fitted_on:
        held = corpus.fit_critical_scale([r for r in rows if r.source != source])
        assert abs(math.log(held / fit)) < math.log(3.0), source  # no one source carries the fit


def test_critical_scale_override_reaches_the_engine_and_is_restored(rows):
    row = next(r for r in rows if r.id == "gpt3-6.7b-sb")
    before, constant = row.value(recommend(row.request())), priors.CRITICAL_BATCH_SCALE
    with corpus.critical_scale(constant * 100):  # B_noise far above the batches: the sqrt regime again
        moved = row.value(recommend(row.request()))
    assert moved > before * 1.3
    assert priors.CRITICAL_BATCH_SCALE == constant and row.value(recommend(row.request())) == before


def test_lars_warmup_batch_is_the_corpus_fit_and_the_growth_is_continuous(rows):
    fit = corpus.fit_lars_warmup_batch(rows)
    assert abs(math.log(priors.LARS_WARMUP_BATCH / fit)) < 0.05
    for source in {r.source for r in corpus._lars_warmup_rows(rows)}:
        held = corpus.fit_lars_warmup_batch([r for r in rows if r.source != source])
        assert abs(math.log(held / fit)) < math.log(2.0), source
    # LARS warmup epochs: flat well below the fitted batch, growing past it, with no step anywhere.
    ref = {"batch_size": 8192, "lr": 10.0, "optimizer": "lars", "warmup_steps": 782, "steps": 14075}
    model = {"params": 25_557_032, "family": "cnn"}

    def epochs(batch: int) -> float:
        s = recommend({"model": model, "reference": ref, "target": {"batch_size": batch}}).stages[0]
        return s.warmup_steps * s.batch_size / 1_281_167

    assert epochs(8192) == pytest.approx(5.0, rel=1e-3)
    assert epochs(512) > 5.0 / 1.8  # about constant epochs far below
    assert 2 * epochs(16384) < epochs(65536)
    assert epochs(32767) == pytest.approx(epochs(32768), rel=1e-3)
