"""Offline mode: the recipe from the local engine, when no service is reachable.

The service computes a recipe with the same engine (``largebatch.scaling_rules``), fed with the
study's history. For a study without history, or without a study, the two are identical: this is
what :func:`recommend_local` returns. It opens no run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from largebatch.scaling_rules.engine import recommend
from largebatch.scaling_rules.models import RecommendationRequest
from largebatch.scaling_rules.wire import RecommendationIn, RecommendationOut

__all__ = ["recommend_local"]

# RecommendationIn's own fields: where to file the request, not what to compute.
_FILING = frozenset(set(RecommendationIn.model_fields) - set(RecommendationRequest.model_fields))


def recommend_local(request: RecommendationIn | RecommendationRequest | Mapping[str, Any] | None = None,
                    /, **fields: Any) -> RecommendationOut:
    """The recipe for ``request``, computed here (no network), shaped as the service's answer.

    Accepts the same input as :meth:`Client.recommend`; ``study``, ``start_run`` and the other
    filing fields are accepted and ignored (there is no study history offline).

    Raises:
        pydantic.ValidationError: a malformed request.
        largebatch.scaling_rules.RecipeError: a request that contradicts itself.
    """
    if request is None:
        data: dict[str, Any] = {}
    elif isinstance(request, BaseModel):
        data = request.model_dump(exclude_unset=True)
    else:
        data = dict(request)
    data.update(fields)
    checked = RecommendationIn.model_validate(data)  # the same validation the service applies
    engine_request = RecommendationRequest.model_validate(
        checked.model_dump(exclude=set(_FILING), exclude_unset=True))
    recipe = recommend(engine_request)
    return RecommendationOut(**recipe.model_dump())
