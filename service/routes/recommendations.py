"""``POST /v1/recommendations`` and its LR-schedule plots."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request, Response, status
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

from largebatch.scaling_rules.wire import RecommendationIn, RecommendationOut
from largebatch.service.auth import authenticate
from largebatch.service.convert import check_recipe
from largebatch.service.deps import (
    IDEMPOTENCY_KEY_PATTERN,
    Reader,
    check_idempotency_key,
    parse_json_body,
    variant_key,
)
from largebatch.service.errors import ERROR_RESPONSES, ApiError, field_error
from largebatch.service.explore import explore_variants, user_cap_factor
from largebatch.service.recipes import RecipeMemo, compute_recipe, fresh_serial, gather_history
from largebatch.service.routes._fast import FastRoute
from largebatch.service.routes.runs import open_run

router = APIRouter(prefix="/v1", tags=["recommendations"])

_JSON = "application/json"
# A plot's cost grows with the stages it shades and labels (~30 ms each): bounded at parse time.
MAX_PLOT_STAGES = 16


def _check_explore(body: RecommendationIn) -> None:
    if body.explore_warmup and not body.explore:
        raise field_error(["body", "explore_warmup"], "explore_warmup varies the warmup of explore's variants: it "
                          "needs explore >= 1", "value_error")
    if body.explore and body.study is None:
        raise field_error(["body", "study"], "explore opens one run per variant: it needs a study", "missing")


def _check(body: RecommendationIn) -> None:
    _check_explore(body)
    if body.start_run and body.study is None:
        raise field_error(["body", "study"], "start_run needs a study to open the run in", "missing")


def _needs_store(body: RecommendationIn) -> bool:
    return body.study is not None or body.use_family_evidence


def _recipe_with_history(request: Request, ns: str, body: RecommendationIn):
    store = request.app.state.store_holder.get()
    evidence = gather_history(store, ns, body.study, body, use_family=body.use_family_evidence,
                              cache=request.app.state.evidence_cache)
    return store, evidence, compute_recipe(body, evidence)


# The hot path. A recommendation is pure computation (~0.05 ms), so FastAPI's generic parameter
# machinery would cost more than the recipe: this endpoint authenticates, reads the header and parses
# the body itself (pydantic straight from the JSON bytes), with the same validation and the same errors.
# It is registered twice: as a FastAPI route, which documents it (`openapi_extra` describes the body and
# the header), and, ahead of it, as a plain Starlette route that serves it (see `fast_routes`); the
# app's exception handlers and middleware apply to both alike.
_RECOMMEND_DOC = {
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/RecommendationIn"}}}},
    "parameters": [{
        "name": "Idempotency-Key", "in": "header", "required": False,
        "description": "With start_run: the same key returns the run the first request opened.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": IDEMPOTENCY_KEY_PATTERN},
    }],
}
_NO_RUN = b',"run":null,"variants":[],"variant_runs":[]}'


def _recipe_only_json(recipe) -> bytes:
    """``RecommendationOut`` without a run, serialised at the cost of the recipe alone."""
    return recipe.model_dump_json().encode()[:-1] + _NO_RUN


@router.post(
    "/recommendations",
    response_model=RecommendationOut,
    responses=ERROR_RESPONSES,
    openapi_extra=_RECOMMEND_DOC,
    summary="A large-batch recipe for a reference setup (optionally opening a run)",
    description=(
        "Body: the recipe engine's request, plus an optional `study` whose evidence shapes the recipe: its "
        "finished runs fit the LR-vs-batch curve and its divergences cap the LR (`use_family_evidence` adds the "
        "studies of the same family within 2x the model size). `explore: k` also returns k variants (LRs from "
        "Optuna's TPE sampler at the fixed batch size; `explore_warmup: true` varies their warmups too, shorter only) "
        "and opens a run for each. With `start_run: true` a run is opened in that study for the recipe and returned as "
        "`run` (needs a write key); an `Idempotency-Key` header makes that retry-safe: the same key returns "
        "the run the first request opened. Always 200."
    ),
)
async def create_recommendation(request: Request) -> Response:
    principal = await authenticate(request, "read")
    idempotency_key = check_idempotency_key(request.headers.get("idempotency-key"))
    raw = await request.body()
    memo: RecipeMemo = request.app.state.recipe_memo
    answer = memo.get(raw)  # bytes seen before, validated then and needing no store: the same answer
    if answer is not None:
        return Response(answer, media_type=_JSON)
    body = parse_json_body(RecommendationIn, raw)
    _check(body)
    if (body.start_run or body.explore) and not principal.allows("write"):
        raise ApiError("forbidden", "start_run and explore open runs: this needs a key with write scope")
    if not _needs_store(body):
        if not body.stages:  # one stage: ~0.1 ms whatever the numbers (closed forms), cheaper than a thread hop
            return Response(memo.put(raw, _recipe_only_json(compute_recipe(body))), media_type=_JSON)
        # Up to MAX_STAGES stages cost milliseconds: off the event loop, like every other engine call.
        answer = await run_in_threadpool(lambda: _recipe_only_json(compute_recipe(body)))
        return Response(memo.put(raw, answer), media_type=_JSON)

    if not body.start_run and not body.explore and body.study is not None:
        serial = fresh_serial(request.app.state.store_holder.store, principal.namespace, body.study, body,
                              use_family=body.use_family_evidence, cache=request.app.state.evidence_cache)
        answer = None if serial is None else memo.get(raw, (principal.namespace, serial))
        if answer is not None:
            return Response(answer, media_type=_JSON)

    def work() -> bytes:
        if not body.start_run and not body.explore:  # a read: the same evidence, the same answer
            store = request.app.state.store_holder.get()
            evidence = gather_history(store, principal.namespace, body.study, body,
                                      use_family=body.use_family_evidence, cache=request.app.state.evidence_cache)
            if evidence.serial is None:
                return _recipe_only_json(compute_recipe(body, evidence))
            context = (principal.namespace, evidence.serial)
            return memo.get(raw, context) or memo.put(raw, _recipe_only_json(compute_recipe(body, evidence)), context)
        store, evidence, recipe = _recipe_with_history(request, principal.namespace, body)
        assert body.study is not None
        out = RecommendationOut(**recipe.model_dump())
        if body.explore:
            # Every variant checked before any run is opened: a 422 leaves no run behind.
            out.variants = [check_recipe(v, ["body", "explore"], computed=True) for v in explore_variants(
                recipe, evidence.runs, body.explore, study=body.study, model=evidence.model,
                direction=evidence.direction, max_factor=user_cap_factor(body, recipe),
                explore_warmup=body.explore_warmup)]
        if body.start_run:
            out.run, _ = open_run(request, store, principal.namespace, body.study, recipe,
                                  idempotency_key, body.environment, body)
        for i, variant in enumerate(out.variants):
            key = variant_key(idempotency_key, i)
            run, _ = open_run(request, store, principal.namespace, body.study, variant, key, body.environment,
                              body, variant=True)
            out.variant_runs.append(run)
        return out.model_dump_json().encode()

    return Response(await run_in_threadpool(work), media_type=_JSON)


def fast_routes() -> list[Route]:
    """Plain Starlette routes serving the hot endpoints (put them before the documented FastAPI routes)."""
    return [FastRoute("/v1/recommendations", create_recommendation, methods=["POST"], name="create_recommendation")]


def _plot(fmt: Literal["png", "svg"]):
    media = "image/png" if fmt == "png" else "image/svg+xml"

    async def plot(body: RecommendationIn, principal: Reader, request: Request) -> Response:
        _check_explore(body)
        if body.stages is not None and len(body.stages) > MAX_PLOT_STAGES:
            raise field_error(["body", "stages"], f"a plot draws at most {MAX_PLOT_STAGES} stages", "too_long")

        def work() -> bytes:
            from largebatch.scaling_rules.plot import render_schedule

            if _needs_store(body):
                _, _, recipe = _recipe_with_history(request, principal.namespace, body)
            else:
                recipe = compute_recipe(body)
            return render_schedule(recipe, fmt)

        return Response(await run_in_threadpool(work), media_type=media)

    plot.__name__ = f"recommendation_schedule_{fmt}"
    return router.post(
        f"/recommendations/schedule.{fmt}",
        response_class=Response,
        status_code=status.HTTP_200_OK,
        responses={200: {"content": {media: {"schema": {"type": "string", "format": "binary"}}},
                         "description": f"The LR-over-steps plot ({fmt.upper()})"}, **ERROR_RESPONSES},
        summary=f"The recipe's LR schedule as {fmt.upper()}",
        description="Same body as `POST /v1/recommendations` (at most 16 stages); never opens a run (`start_run` "
                    "is ignored).",
    )(plot)


_plot("png")
_plot("svg")
