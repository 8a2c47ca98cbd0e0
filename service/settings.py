"""Service settings, from the environment (``LARGEBATCH_*``) or passed to :func:`create_app`."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from largebatch.scaling_rules.wire import NAME_PATTERN

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Every knob of the service. ``LARGEBATCH_STORE_URL=postgresql+psycopg://...`` and so on."""

    model_config = SettingsConfigDict(env_prefix="LARGEBATCH_", env_ignore_empty=True, extra="ignore")

    store_url: str | None = Field(
        default=None,
        description="Study store URL: sqlite:///path, postgresql+psycopg://user@host/db or 'memory'. "
                    "None: a SQLite file under $XDG_DATA_HOME/largebatch (zero configuration).",
    )
    init_schema: bool = Field(
        default=True, description="Create/upgrade the store schema at start-up (safe from many processes)."
    )
    open_mode: bool = Field(
        default=False,
        description="No API key needed: requests without a key act in `open_namespace` with write scope. "
                    "`largebatch serve` turns it on for loopback hosts unless --require-keys.",
    )
    open_namespace: str = Field(default="default", pattern=NAME_PATTERN)
    key_cache_seconds: float = Field(
        default=5.0, ge=0, description="How long a looked-up API key is trusted before the store is asked again "
                                       "(a revoked key stops working within this time)."
    )
    evidence_fresh_s: float = Field(
        default=0.5, ge=0, description="How long a worker reuses a study's evidence read for recommendations "
                                       "(its own writes are seen at once; another worker's within this time)."
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default=["localhost", "127.0.0.1", "::1"],
        description="Host names the service answers to (the Host header); any other is 400, so a page whose DNS "
                    "name is rebound to this machine reaches nothing. Comma-separated in LARGEBATCH_ALLOWED_HOSTS; "
                    "'*' allows any. `largebatch serve --host NAME` adds NAME.",
    )
    max_body_bytes: int = Field(default=1 << 20, gt=0, description="Larger request bodies get 413.")
    rate_limit_per_s: float | None = Field(
        default=None, gt=0, description="Sustained requests per second per API key (or client IP); None: off."
    )
    rate_limit_burst: int = Field(default=100, gt=0, description="Token-bucket size of the rate limiter.")
    lease_seconds: float = Field(
        default=600.0, gt=0, description="A run without a heartbeat for this long is marked preempted."
    )
    explore_claim_s: float = Field(
        default=120.0, gt=0,
        description="An `explore` variant run nobody has started (no heartbeat or report) is marked preempted after "
                    "this long; the job that later starts it brings it back to running (its first heartbeat or "
                    "report revives it), so handing out variants nobody trains leaves no run `running` for long.",
    )
    sweep_interval_s: float = Field(default=30.0, gt=0, description="How often the lease sweeper runs.")
    retry_after_s: int = Field(default=5, ge=1, description="Retry-After sent with 503 store_unavailable.")
    store_timeout_s: float = Field(
        default=5.0, gt=0, le=600,
        description="The longest one store operation waits on the database: for a pooled connection, for each "
                    "statement (PostgreSQL statement_timeout), for SQLite's write lock. Past it the request answers "
                    "503 store_unavailable with Retry-After: a request waits at most about twice this long.",
    )
    read_timeout_s: float = Field(
        default=10.0, gt=0, le=600,
        description="`largebatch serve`: a client must send a whole request (headers and body) within this many "
                    "seconds of its first byte (or of connecting), else the connection is closed.",
    )
    keep_alive_s: float = Field(
        default=5.0, gt=0, le=600, description="`largebatch serve`: an idle keep-alive connection is closed after this."
    )
    ready_timeout_s: float = Field(
        default=1.5, gt=0, le=60, description="/readyz answers 503 when the store has not answered within this time."
    )
    divergence_factor: float = Field(
        default=3.0, gt=1, description="should_stop when a loss exceeds this multiple of the run's early loss."
    )
    divergence_window: int = Field(
        default=5, ge=1, description="How many of a run's first reports define its early loss (their median)."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _host_list(cls, v):
        if isinstance(v, str):
            return [h.strip() for h in v.split(",") if h.strip()]
        return v

    @field_validator("divergence_factor", "lease_seconds", "explore_claim_s", "sweep_interval_s", "store_timeout_s", "ready_timeout_s",
                     "read_timeout_s", "keep_alive_s", "evidence_fresh_s")
    @classmethod
    def _finite(cls, v: float, info) -> float:
        if not math.isfinite(v):
            raise ValueError(f"{info.field_name} must be finite")
        return v
