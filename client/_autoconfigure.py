"""``Client.autoconfigure`` and ``AsyncClient.autoconfigure``: ask for a recipe, open the run, build
the optimizer and scheduler, return a :class:`Job`.

The conversation with the service (recommend; on 404 create the study and recommend again; on a
transient error fall back to the locally computed recipe if asked) is written once, as a plan: a
generator that yields the :class:`~largebatch.client._base.Call` to make next and is sent back its
answer (or thrown its error). :func:`autoconfigure` runs the plan with a sync client,
:func:`autoconfigure_async` with an async one; nothing else differs.

torch is imported (through ``largebatch.client.optim``) only when a job is built.

Under several ranks only rank 0 runs the plan; a rank > 0 makes a job that waits for rank 0's recipe
(:meth:`Job.sync`); when rank 0 cannot make its job (a refused resume, a bad argument, the service
refusing), the others get its error instead of the recipe. Rank 0 also leaves the recipe in its environment (``LARGEBATCH_JOB``), so that
ranks a launcher starts from it later (Lightning's DDP launcher re-runs the script) have the recipe
before the process group exists: they can size their ``Trainer`` from it at once.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import sys
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from largebatch.scaling_rules.models import Recipe, Reference
from largebatch.scaling_rules.wire import RecommendationIn, RecommendationOut, Run, Study

from . import _dist, errors
from ._base import BaseClient, Call, RunChannel, _new_idempotency_key, is_transient
from ._resume import resume_run, saved_reports, takes_reports
from ._version import __version__
from .job import Job

T = TypeVar("T")


# What the two drivers need of a client: :meth:`Client.send` / :meth:`AsyncClient.send` (structural,
# so that this module, which both clients import, imports neither).
class _Client(Protocol):
    def send(self, call: Call[T]) -> T: ...


class _AsyncClient(Protocol):
    async def send(self, call: Call[T]) -> T: ...

__all__ = ["autoconfigure", "autoconfigure_async", "build_request", "count_parameters", "default_environment"]

log = logging.getLogger("largebatch.client")


def count_parameters(model: Any) -> int:
    """Trainable parameters of a torch module (duck-typed: anything with ``parameters()``)."""
    return int(sum(p.numel() for p in model.parameters() if getattr(p, "requires_grad", True)))


_CNN = ("Conv1d", "Conv2d", "Conv3d")
_TRANSFORMER_HINTS = ("Attention", "Transformer", "Embedding")


def infer_family(model: Any) -> str:
    """The model family the priors are keyed by, from the module types (duck-typed, no torch import):
    convolutions make a ``cnn``, attention or token embeddings a ``transformer``, anything else
    ``other`` (an MLP is not a BERT: it gets no transformer cap prior)."""
    modules = getattr(model, "modules", None)
    names = [type(m).__name__ for m in modules()] if callable(modules) else []
    if any(n in _CNN for n in names):
        return "cnn"
    if any(h in n for n in names for h in _TRANSFORMER_HINTS):
        return "transformer"
    return "other"


def default_environment(model: Any = None) -> dict[str, Any]:
    """What the run records about where it ran."""
    env: dict[str, Any] = {"client": f"largebatch-client {__version__}", "python": platform.python_version(),
                           "platform": platform.platform(terse=True), "host": socket.gethostname()}
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch"] = torch.__version__
    if model is not None:
        try:
            env["device"] = str(next(iter(model.parameters())).device)
        except (StopIteration, AttributeError, TypeError):
            pass
    return env


def build_request(model: Any, *, study: str, reference: Reference | Mapping[str, Any] | None,
                  target_batch_size: int | None, target_steps: int | None = None, model_params: int | None = None,
                  model_family: str | None = None, environment: Mapping[str, Any] | None = None,
                  **request_fields: Any) -> RecommendationIn:
    """The ``start_run`` request :func:`autoconfigure` sends (validated locally)."""
    fields: dict[str, Any] = dict(request_fields)
    if "model" not in fields:
        fields["model"] = {"params": model_params or count_parameters(model),
                           "family": model_family or infer_family(model)}
    if reference is not None:
        fields["reference"] = reference
    if target_batch_size is not None:
        fields["target"] = {"batch_size": target_batch_size, **({"steps": target_steps} if target_steps else {})}
    fields.update(study=study, start_run=True,
                  environment={**default_environment(model), **dict(environment or {})})
    return RecommendationIn.model_validate(fields)


def _study_args(req: RecommendationIn, metric: str, direction: str) -> dict[str, Any]:
    assert req.study is not None
    return {"model_params": req.model.params, "model_family": req.model.family, "metric": metric,
            "direction": direction}


def _open_offline(req: RecommendationIn, recipe: Recipe, key: str, create_study: bool, metric: str,
                  direction: str) -> Callable[[RunChannel], Run]:
    """How the background thread opens the run once the service answers (offline fallback)."""

    def open_run(client: RunChannel) -> Run:
        assert req.study is not None
        try:
            return client.create_run(req.study, recipe=recipe, environment=req.environment, idempotency_key=key)
        except errors.NotFoundError:
            if not create_study:
                raise
            try:
                client.create_study(req.study, **_study_args(req, metric, direction))
            except errors.AlreadyExistsError:
                pass
            return client.create_run(req.study, recipe=recipe, environment=req.environment, idempotency_key=key)

    return open_run


def _build(model: Any, recipe: Recipe) -> tuple[Any, Any]:
    from largebatch.client.optim import build

    return build(model, recipe)


@dataclass
class _Answer:
    """What the service said: the recommendation (None: unreachable, train offline) and the study
    if this job created it."""

    out: RecommendationOut | None
    study_info: Study | None = None
    offline_reason: BaseException | None = None


_Plan = Generator[Call[Any], Any, _Answer]


def _plan(client: BaseClient, req: RecommendationIn, key: str, *, create_study: bool, metric: str,
          direction: str, offline_fallback: bool) -> _Plan:
    """The calls autoconfigure makes, whichever client sends them."""
    assert req.study is not None
    study_info: Study | None = None
    try:
        try:
            out = yield client._recommend(req, {}, key)
        except errors.NotFoundError:
            if not create_study:
                raise
            try:
                study_info = yield client._create_study(req.study, **_study_args(req, metric, direction),
                                                        idempotency_key=None)
            except errors.AlreadyExistsError:  # another job created it meanwhile
                pass
            out = yield client._recommend(req, {}, key)
    except errors.APIError as e:
        if not (offline_fallback and is_transient(e)):
            raise
        return _Answer(None, study_info, e)
    return _Answer(out, study_info)


def _run_sync(plan: _Plan, client: _Client) -> _Answer:
    answer: Any = None
    error: errors.APIError | None = None
    while True:
        try:
            call = plan.throw(error) if error is not None else plan.send(answer)
        except StopIteration as done:
            return done.value
        try:
            answer, error = client.send(call), None
        except errors.APIError as e:
            answer, error = None, e


async def _run_async(plan: _Plan, client: _AsyncClient) -> _Answer:
    answer: Any = None
    error: errors.APIError | None = None
    while True:
        try:
            call = plan.throw(error) if error is not None else plan.send(answer)
        except StopIteration as done:
            return done.value
        try:
            answer, error = await client.send(call), None
        except errors.APIError as e:
            answer, error = None, e


def _make_job(client: BaseClient, model: Any, req: RecommendationIn, answer: _Answer, *, key: str,
              create_study: bool, metric: str, direction: str, job_options: Mapping[str, Any] | None) -> Job:
    out = answer.out
    if out is None:
        from .offline import recommend_local

        out = recommend_local(req)  # it leaves out the fields only the service reads (study, explore, ...)
        log.warning("largebatch: service unreachable (%s): training with the recipe computed locally; the run "
                    "will be opened and the reports delivered when the service answers", answer.offline_reason)
        open_run = _open_offline(req, out, key, create_study, metric, direction)
    else:
        open_run = None
        if out.run is None:
            raise errors.JobError("the service answered without opening a run")
    if out.run is not None and not takes_reports(out.run):  # an idempotency key reused after the run ended
        raise errors.JobError(
            f"run {out.run.id} (the one this idempotency_key opened) is {out.run.state}: it takes no more reports. "
            "To continue after a crash, save job.state_dict() with your checkpoint and pass it as "
            "autoconfigure(..., resume=state) (new_attempt=True for a run that ended), or drop the key for a new run")
    recipe = Recipe.model_validate(out.model_dump(exclude={"run", "variants", "variant_runs"}))
    optimizer, scheduler = _build(model, recipe)
    return Job(client, out.run, recipe, optimizer, scheduler, study=req.study, study_info=answer.study_info,
               open_run=open_run, model=model, **dict(job_options or {}))


HANDOVER_ENV = "LARGEBATCH_JOB"


def _hand_over(job: Job) -> Job:
    """Rank 0's job, its recipe and run left in the environment and handed to the other ranks."""
    os.environ[HANDOVER_ENV] = json.dumps({"parent": os.getpid(), **job.handover()}, separators=(",", ":"))
    if _dist.ensure_group():
        job.sync()
    return job


def _resumed_job(client: BaseClient, model: Any, study: str, state: Any, new_attempt: bool,
                 environment: Mapping[str, Any] | None, job_options: Mapping[str, Any] | None) -> Job:
    """Rank 0's job for ``resume=state`` (:mod:`largebatch.client._resume`)."""
    channel = client.run_channel()

    def attempt(old: Run, link: dict[str, Any]) -> Run:
        env = {**default_environment(model), **dict(environment or {}), **link}
        return channel.create_run(study, recipe=old.recipe, environment=env)

    run = resume_run(channel.get_run, attempt, state, study=study, new_attempt=new_attempt)
    optimizer, scheduler = _build(model, run.recipe)
    job = Job(client, run, run.recipe, optimizer, scheduler, study=study, model=model, **dict(job_options or {}))
    if run.id == state["run"]:  # a new attempt starts after them; they belong to the run that ended
        job.resend(saved_reports(state))
    return job


def _follower_job(client: BaseClient, model: Any, study: str, job_options: Mapping[str, Any] | None) -> Job:
    """The job of a rank > 0: no call to the service; the recipe comes from rank 0."""
    job = Job(client, None, None, study=study, build=lambda recipe: _build(model, recipe), model=model,
              **dict(job_options or {}))
    handed = os.environ.get(HANDOVER_ENV)
    if handed:
        try:
            data = json.loads(handed)
        except ValueError:
            data = None
        # Only what our own parent left (an inherited value from another job's launch is stale).
        if isinstance(data, dict) and data.get("parent") == os.getppid() and data.get("study") == study:
            job._adopt(Recipe.model_validate(data["recipe"]), data.get("run"), study)
    if _dist.ensure_group():
        job.sync()
    return job


def autoconfigure(client: BaseClient, model: Any, *, study: str, reference: Reference | Mapping[str, Any] | None,
                  target_batch_size: int | None, target_steps: int | None = None, model_params: int | None = None,
                  model_family: str | None = None, environment: Mapping[str, Any] | None = None,
                  idempotency_key: str | None = None, create_study: bool = True, metric: str = "eval_loss",
                  direction: str = "minimize", job_options: Mapping[str, Any] | None = None,
                  offline_fallback: bool = False, **request_fields: Any) -> Job:
    """See :meth:`Client.autoconfigure`. ``resume``: a :meth:`Job.state_dict` to continue (with
    ``new_attempt=True``, as a new attempt of a run that ended; :mod:`largebatch.client._resume`)."""
    resume, new_attempt = request_fields.pop("resume", None), bool(request_fields.pop("new_attempt", False))
    if _dist.identity().follower:
        return _follower_job(client, model, study, job_options)
    try:
        if resume is not None:
            job = _resumed_job(client, model, study, resume, new_attempt, environment, job_options)
        else:
            req = build_request(model, study=study, reference=reference, target_batch_size=target_batch_size,
                                target_steps=target_steps, model_params=model_params, model_family=model_family,
                                environment=environment, **request_fields)
            key = idempotency_key or _new_idempotency_key()
            plan = _plan(client, req, key, create_study=create_study, metric=metric, direction=direction,
                         offline_fallback=offline_fallback)
            job = _make_job(client, model, req, _run_sync(plan, client), key=key, create_study=create_study,
                            metric=metric, direction=direction, job_options=job_options)
    except Exception as e:
        Job.refuse(e)
        raise
    return _hand_over(job)


async def autoconfigure_async(client: BaseClient, model: Any, *, study: str,
                              reference: Reference | Mapping[str, Any] | None, target_batch_size: int | None,
                              target_steps: int | None = None, model_params: int | None = None,
                              model_family: str | None = None, environment: Mapping[str, Any] | None = None,
                              idempotency_key: str | None = None, create_study: bool = True,
                              metric: str = "eval_loss", direction: str = "minimize",
                              job_options: Mapping[str, Any] | None = None, offline_fallback: bool = False,
                              **request_fields: Any) -> Job:
    """See :meth:`AsyncClient.autoconfigure`. The job's thread reports with the sync client of
    :meth:`AsyncClient.run_channel`."""
    resume, new_attempt = request_fields.pop("resume", None), bool(request_fields.pop("new_attempt", False))
    if _dist.identity().follower:
        return _follower_job(client, model, study, job_options)
    try:
        if resume is not None:
            job = _resumed_job(client, model, study, resume, new_attempt, environment, job_options)
        else:
            req = build_request(model, study=study, reference=reference, target_batch_size=target_batch_size,
                                target_steps=target_steps, model_params=model_params, model_family=model_family,
                                environment=environment, **request_fields)
            key = idempotency_key or _new_idempotency_key()
            plan = _plan(client, req, key, create_study=create_study, metric=metric, direction=direction,
                         offline_fallback=offline_fallback)
            answer = await _run_async(plan, client)
            job = _make_job(client, model, req, answer, key=key, create_study=create_study, metric=metric,
                            direction=direction, job_options=job_options)
    except Exception as e:
        Job.refuse(e)
        raise
    return _hand_over(job)
