"""One valid example body for every request body the API documents, so that "Try it out" in ``/docs``
sends a request the service accepts: the LAMB paper's Table 4 setting (BERT-Large, 512 -> 32K) where a
recipe is asked for. ``tests/service/test_docs_examples.py`` sends each of them to the app."""

from __future__ import annotations

import functools
from typing import Any

from largebatch.scaling_rules.published import BERT_LARGE, LAMB_REF

__all__ = ["LAMB_TABLE_4", "add_body_examples", "body_examples"]

# BERT-Large at batch 512 with LAMB scaled to batch 32K: the LAMB paper's Table 4 (the engine's seed vector).
LAMB_TABLE_4: dict[str, Any] = {"model": BERT_LARGE, "reference": LAMB_REF, "target": {"batch_size": 32768}}


@functools.cache
def _table_4_recipe() -> dict[str, Any]:
    from largebatch.scaling_rules import recommend

    return recommend(LAMB_TABLE_4).model_dump(mode="json")


def body_examples() -> dict[tuple[str, str], dict[str, Any]]:
    return {
        ("post", "/v1/recommendations"): LAMB_TABLE_4,
        ("post", "/v1/recommendations/schedule.png"): LAMB_TABLE_4,
        ("post", "/v1/recommendations/schedule.svg"): LAMB_TABLE_4,
        ("post", "/v1/studies"): {"name": "bert-large", "model_params": 340_000_000, "model_family": "transformer",
                                  "metric": "eval_loss", "direction": "minimize"},
        ("post", "/v1/studies/{name}/runs"): {"request": LAMB_TABLE_4, "environment": {"gpus": 64}},
        ("post", "/v1/runs/{id}/reports"): {"reports": [{"step": 100, "loss": 7.9, "grad_norm": 1.2},
                                                        {"step": 200, "loss": 6.8, "grad_norm": 1.1}]},
        ("post", "/v1/runs/{id}/complete"): {"outcome": "completed", "metric": 1.62},
        ("post", "/v1/runs/{id}/critical-batches"): {
            "step": 2000, "examples_seen": 1_024_000, "tokens_seen": 131_072_000, "critical_batch": 1800.0,
            "critical_batch_low": 1200.0, "critical_batch_high": 2600.0, "noise_scale": 1500.0, "batch_size": 512,
            "ks": [1, 2, 4, 8], "window_examples": 32768},
        ("post", "/v1/schedule"): _table_4_recipe(),
    }





def add_body_examples(schema: dict[str, Any]) -> None:
    """Put each operation's example into its JSON request body (what Swagger UI pre-fills)."""
    examples = body_examples()
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            example = examples.get((method, path))
            body = op.get("requestBody", {}).get("content", {}).get("application/json") if isinstance(op, dict) else None
            if example is not None and body is not None:
                body["example"] = example
