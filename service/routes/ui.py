"""What a person opens in a browser: the recipe explorer at ``/`` and the API docs at ``/docs`` and
``/redoc``, every asset served by the service itself (no CDN: the docs work on a network cut off
from the internet).

The explorer's files ship inside the package (``largebatch/service/static``); Swagger UI's and
ReDoc's come from the ``fastapi-offline`` distribution, which packages their release bundles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from largebatch.service.deps import add_body_schemas
from largebatch.service.examples import add_body_examples

__all__ = ["BEARER_SCHEME", "install"]

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
EXPLORER_DIR = STATIC_DIR / "explorer"
BEARER_SCHEME = "APIKey"
_KEYED_PREFIXES = ("/v1/",)  # operations that take a key; the probes (/healthz, /readyz, /metrics) do not

# The pages load nothing from elsewhere, and the browser is told so: ReDoc's bundle would otherwise
# fetch a decorative logo from its vendor's CDN. Swagger UI and ReDoc start from an inline script, and
# ReDoc runs its search in a blob: worker; the explorer needs neither.
_CSP_DOCS = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
             "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'")
_CSP_EXPLORER = "default-src 'self'; img-src 'self' data:; connect-src 'self'"


def _docs_assets_dir() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).resolve().parent / "static"


def _add_bearer_scheme(schema: dict[str, Any]) -> None:
    """The bearer scheme, so /docs has an Authorize button for API keys.

    Each /v1 operation lists the key as one option and, because open mode serves requests without
    one, an empty requirement as the other."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER_SCHEME] = {
        "type": "http", "scheme": "bearer",
        "description": "An API key (`largebatch keys create`), sent as `Authorization: Bearer <key>`. "
                       "A service in open mode also answers without one.",
    }
    for path, item in schema.get("paths", {}).items():
        if path.startswith(_KEYED_PREFIXES):
            for op in item.values():
                if isinstance(op, dict):
                    op["security"] = [{BEARER_SCHEME: []}, {}]


def install(app: FastAPI, *, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Mount the explorer and the offline docs on ``app`` (created with ``docs_url=None, redoc_url=None``)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()  # FastAPI's own schema, cached on the app: amended once
            _add_bearer_scheme(schema)
            add_body_schemas(schema)
            add_body_examples(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount("/docs-assets", StaticFiles(directory=_docs_assets_dir()), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/", include_in_schema=False)
    async def explorer() -> FileResponse:
        return FileResponse(EXPLORER_DIR / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": _CSP_EXPLORER})

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")  # behind a proxy that strips a prefix
        page = get_swagger_ui_html(
            openapi_url=root + openapi_url, title=f"{app.title} API",
            swagger_js_url=f"{root}/docs-assets/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs-assets/swagger-ui.css",
            swagger_favicon_url=f"{root}/docs-assets/favicon.png",
            swagger_ui_parameters={"persistAuthorization": True, "validatorUrl": None},
        )
        page.headers["Content-Security-Policy"] = _CSP_DOCS
        return page

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        page = get_redoc_html(openapi_url=root + openapi_url, title=f"{app.title} API",
                              redoc_js_url=f"{root}/docs-assets/redoc.standalone.js",
                              redoc_favicon_url=f"{root}/docs-assets/favicon.png", with_google_fonts=False)
        page.headers["Content-Security-Policy"] = _CSP_DOCS
        return page
