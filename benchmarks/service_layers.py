"""Per-request cost of the service, layer by layer, in-process (``benchmarks/service_load.py`` prints it
before its load test): the bare FastAPI app and the service called as a server calls them (raw ASGI, no
sockets), in turns, the fastest of several rounds kept, with the parts of a recommendation alone.
"""

from __future__ import annotations

import math
import time

from service_load import _BODY, _STUDY_BODY, HOST, trivial_app


def _asgi_scope(method: str, path: str, body: bytes | None, key: str) -> dict:
    headers = [(b"host", HOST.encode()), (b"authorization", f"Bearer {key}".encode())]
    if body is not None:
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
            "client": (HOST, 50000), "server": (HOST, 8000)}


async def _asgi_loop(app, method: str, path: str, body: bytes | None, key: str, n: int) -> float:
    """Seconds per request of ``app`` called ``n`` times as a server calls it (no sockets, no HTTP parsing)."""
    scope = _asgi_scope(method, path, body, key)
    statuses: list[int] = []
    request = {"type": "http.request", "body": body or b"", "more_body": False}

    async def receive():
        return request

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    t0 = time.perf_counter()
    for _ in range(n):
        await app(dict(scope), receive, send)
    took = (time.perf_counter() - t0) / n
    if statuses[-1] >= 300:
        raise RuntimeError(f"{method} {path} answered {statuses[-1]}")
    return took


def in_process_costs(url: str, key: str, n: int, rounds: int) -> dict[str, float]:
    """Microseconds per request of each case, the bare app and the service side by side in this process:
    each case runs ``rounds`` times in turns and keeps its fastest round (the machine's load only adds)."""
    import asyncio

    from starlette.concurrency import run_in_threadpool

    from largebatch.scaling_rules.wire import RecommendationIn
    from largebatch.service.app import create_app
    from largebatch.service.bodycheck import check_body
    from largebatch.service.convert import check_recipe
    from largebatch.service.deps import parse_json_body
    from largebatch.service.recipes import RecipeMemo, compute_recipe, gather_history
    from largebatch.service.routes.recommendations import _recipe_only_json
    from largebatch.service.settings import Settings

    bare = trivial_app()
    app = create_app(Settings(store_url=url, open_mode=False))
    app.state.store_holder.open()
    bare_mw = create_app(Settings(store_url=url, open_mode=False))  # the same service without its middleware
    bare_mw.user_middleware = []
    bare_mw.state.store_holder.open()
    # The engine on every request, the study's evidence read from the store on every request.
    no_memo = create_app(Settings(store_url=url, open_mode=False, evidence_fresh_s=0))
    no_memo.state.recipe_memo = RecipeMemo(max_entries=0)
    no_memo.state.store_holder.open()
    body = parse_json_body(RecommendationIn, _BODY)
    recipe = compute_recipe(body)
    study_body = parse_json_body(RecommendationIn, _STUDY_BODY)
    store = app.state.store_holder.get()
    cache = app.state.evidence_cache

    def loop(f, k: int) -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            f()
        return (time.perf_counter() - t0) / k

    def call(f):
        async def run(k: int) -> float:
            return loop(f, k)
        return run

    def over(target, method, path, payload=None):
        return lambda k: _asgi_loop(target, method, path, payload, key, k)

    async def read_evidence(k: int) -> float:
        cache.fresh_s, fresh = 0.0, cache.fresh_s  # the store's read on every request
        try:
            return await run_in_threadpool(
                loop, lambda: gather_history(store, "bench", "evidence", study_body, cache=cache), k)
        finally:
            cache.fresh_s = fresh

    cases = {
        "bare GET /healthz": (over(bare, "GET", "/healthz"), 1),
        "bare POST (recipe bytes)": (over(bare, "POST", "/trivial", _BODY), 1),
        "GET /healthz": (over(app, "GET", "/healthz"), 1),
        "recommend": (over(app, "POST", "/v1/recommendations", _BODY), 1),
        "recommend, no middleware": (over(bare_mw, "POST", "/v1/recommendations", _BODY), 1),
        "recommend, memo off": (over(no_memo, "POST", "/v1/recommendations", _BODY), 1),
        "recommend-study (200 runs)": (over(app, "POST", "/v1/recommendations", _STUDY_BODY), 1),
        "recommend-study, memo off, read each time": (over(no_memo, "POST", "/v1/recommendations", _STUDY_BODY), 10),
        "  body check (bytes)": (call(lambda: check_body(_BODY)), 1),
        "  pydantic parse + validation": (call(lambda: parse_json_body(RecommendationIn, _BODY)), 1),
        "  engine (recommend)": (call(lambda: compute_recipe(body)), 1),
        "  recipe bounds check": (call(lambda: check_recipe(recipe, ["body"], computed=True)), 1),
        "  JSON encode": (call(lambda: _recipe_only_json(recipe)), 1),
        "  study evidence read (store)": (read_evidence, 10),
    }

    async def measure() -> dict[str, float]:
        best: dict[str, float] = {}
        for run, _ in cases.values():  # warm every path (caches, the threadpool, the key cache)
            await run(20)
        for _ in range(rounds):
            for name, (run, div) in cases.items():
                k = max(5, n // div)
                took = await run(k)
                best[name] = min(best.get(name, math.inf), took * 1e6)
        return best

    return asyncio.run(measure())


def print_in_process(costs: dict[str, float]) -> None:
    print("\nin-process, per request (raw ASGI calls, no sockets; fastest of the rounds):\n")
    print("| case | us/request | vs bare |")
    print("|---|---:|---:|")
    for name, us in costs.items():
        peer = costs["bare GET /healthz"] if "healthz" in name else costs["bare POST (recipe bytes)"]
        ratio = "" if name.startswith(("bare", " ")) else f"{peer / us:.2f}x"
        print(f"| {name.strip()} | {us:.1f} | {ratio} |")
    print(f"\nmiddleware stack: {costs['recommend'] - costs['recommend, no middleware']:.1f} us/request; "
          f"memo off / bare: {costs['bare POST (recipe bytes)'] / costs['recommend, memo off']:.2f}x; "
          f"recommend-study / recommend: {costs['recommend'] / costs['recommend-study (200 runs)']:.2f}x "
          f"(goal >= 0.5); recommend / bare: {costs['bare POST (recipe bytes)'] / costs['recommend']:.2f}x; "
          f"healthz / bare: {costs['bare GET /healthz'] / costs['GET /healthz']:.2f}x")
