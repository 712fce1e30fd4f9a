"""The HTTP app Label Studio talks to: /health, /setup, /predict, /webhook.

We speak the ML-backend protocol ourselves instead of using `label-studio-ml` 1.0.9 (PyPI):
it pins Flask 1.1.2 / werkzeug 2.0.2 and imports redis/rq without declaring them, and the
maintained 2.x is not on PyPI. See README "Why not label-studio-ml".
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from echolabel.core.model import DELETE_EVENTS, LABEL_EVENTS, PREEMBED_EVENTS, SimilarityModel
from echolabel.core.projects import project_id
from echolabel.core.push_state import note_label_changes
from echolabel.core.runtime import Runtime
from echolabel.encoders import EncoderError
from echolabel.images import ImageError
from echolabel.label_config import LabelConfigError, TaskError
from echolabel.settings import Settings
from vectorstore import DimensionMismatchError, StoreError, StoreUnavailableError
from workers.runtime import install, open_runtime, redis_dispatcher

from .admin import Admin
from .doctor import Doctor
from .inbox import WebhookInbox
from .pages import PageRefused, refused, review_router

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 1024 * 1024


class RequestError(ValueError):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def create_app(
    settings: Settings | None = None,
    runtime: Runtime | None = None,
    listen_host: str | None = None,
) -> FastAPI:
    """Build the app; `runtime` may be injected (tests, bench), else opened at start.

    `listen_host` is the address the server binds (`serve --host`): the review and admin
    pages need basic auth unless it is loopback (unknown counts as beyond loopback).
    """
    settings = settings or (runtime.settings if runtime else Settings.from_env())
    state: dict[str, Any] = {}

    def handle_webhook(payload: Mapping[str, Any]) -> object:
        project = payload.get("project")
        config = project.get("label_config") if isinstance(project, Mapping) else None
        model = SimilarityModel(state["runtime"], project, config)
        action = str(payload.get("action"))
        outcome = model.fit(action, payload)
        changed = [*outcome.get("labelled", []), *outcome.get("cleared", [])]
        if changed and note_label_changes(model.store, model.project, changed) >= max(
            settings.refresh_after, 1
        ):
            info = model.store.collection(model.project)
            if settings.refresh_after and info is not None and info.published_version:
                state["admin"].start_refresh(model.project)
        if action in PREEMBED_EVENTS and settings.preannotate_on_import:
            state["admin"].start_preannotate(model.project)
        return outcome

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        built = state["runtime"] = runtime or open_runtime(settings)
        # Opened now: this process holds the embedded store from the start.
        _ = built.store
        # Jobs run in this process (re-embedding) share its store and loaded encoders.
        install(built)
        admin = state["admin"] = Admin(built)
        dispatcher = redis_dispatcher(built)
        if dispatcher is not None:
            dispatcher.start_collector()
            admin.start_store_worker()
        admin.start_refresh_timer(settings.refresh_interval_s)
        # What a crash (or a stop that did not wait) interrupted in this process's threads.
        admin.resume_interrupted()
        admin.start_retraining_timer(settings.retrain_check_s)
        admin.start_centring_timer(settings.retrain_check_s)
        admin.start_index_timer(settings.index_check_s)
        inbox = WebhookInbox(
            settings.model_dir / "webhooks",
            handle_webhook,
            transient=(StoreUnavailableError, RedisConnectionError),
            retry_after_s=settings.job_retry_intervals,
        )
        state["inbox"] = inbox
        inbox.start()
        try:
            yield
        finally:
            inbox.stop()
            admin.stop()
            install(None)
            if runtime is None:
                built.close()

    app = FastAPI(title="echolabel", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.echolabel = state

    if settings.basic_auth_user:
        app.add_middleware(BasicAuth, settings=settings)

    async def errors(_: Request, exc: Exception) -> JSONResponse:
        status, reason = _status_of(exc)
        if status >= 500:
            log.error("request failed", extra={"error": f"{type(exc).__name__}: {exc}"})
        return JSONResponse({"error": reason, "detail": str(exc)}, status_code=status)

    # Specific classes only: a handler for bare Exception would also re-raise in Starlette.
    for error_class in (
        RequestError,
        ImageError,
        LabelConfigError,
        TaskError,
        StoreError,
        EncoderError,
    ):
        app.add_exception_handler(error_class, errors)

    app.add_exception_handler(PageRefused, refused)
    app.include_router(review_router(state, settings, listen_host))

    @app.get("/health")
    @app.get("/")
    async def health() -> dict[str, Any]:
        built: Runtime = state["runtime"]
        inbox: WebhookInbox = state["inbox"]
        return {
            "status": "UP",
            "model_class": "SimilarityModel",
            "encoder": settings.encoder,
            "store": "embedded" if built.store.single_writer else "server",
            "webhooks_pending": len(inbox.pending()),
            "webhooks_failed": len(inbox.failed()),
            "webhooks_blocked_by": inbox.blocked_by,
        }

    @app.post("/setup")
    async def setup(request: Request) -> dict[str, Any]:
        body = await _json_object(request)
        model = SimilarityModel(state["runtime"], body.get("project"), _config(body, "schema"))
        return {"model_version": await run_in_threadpool(model.setup)}

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        body = await _json_object(request)
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise RequestError(422, "bad_request", "`tasks` must be a non-empty list of tasks")
        project = body.get("project") or (
            tasks[0].get("project") if isinstance(tasks[0], dict) else None
        )
        model = SimilarityModel(state["runtime"], project, _config(body, "label_config"))
        outcome = await run_in_threadpool(model.predict, tasks, body.get("params"))
        # Serialised here: FastAPI's encoder would walk the nested predictions once more.
        return JSONResponse(
            {
                "results": outcome.predictions,
                "model_version": model.model_version,
                "abstained": [{"task": t, "fields": f} for t, f in outcome.abstained.items()],
                "pending": sorted(outcome.pending, key=str),
                "errors": [
                    {"task": t, "error": e.reason, "detail": str(e)}
                    for t, e in outcome.errors.items()
                ],
            }
        )

    @app.get("/doctor")
    async def doctor(project: int | None = None, backend_url: str | None = None) -> dict:
        """`echolabel doctor` run inside the backend: with its store and loaded encoder."""
        checker = Doctor(state["runtime"])
        checks = await run_in_threadpool(checker.run, project, backend_url)
        return {"healthy": checker.healthy, "checks": [c.as_dict() for c in checks]}

    @app.get("/jobs")
    async def jobs() -> dict[str, Any]:
        admin: Admin = state["admin"]
        return {"jobs": await run_in_threadpool(admin.jobs)}

    @app.post("/projects/{project}/evaluate")
    async def evaluate(project: str) -> dict[str, Any]:
        """Start the evaluation report of a project (see GET /jobs for its result)."""
        admin: Admin = state["admin"]
        return await run_in_threadpool(admin.start_evaluation, project_id(project))

    @app.post("/projects/{project}/train-encoder")
    async def train_encoder(project: str, request: Request) -> dict[str, Any]:
        """Start training an encoder on the project's labels (see GET /jobs for its progress).
        JSON body, every key optional: fields, name, options (epochs, input_size, ...),
        patient_key, reembed (then re-embed the project with it)."""
        body = await _json_object(request)
        admin: Admin = state["admin"]
        options, fields = body.get("options", {}), body.get("fields", [])
        if not isinstance(options, dict) or not isinstance(fields, list):
            raise RequestError(422, "bad_request", "`options` must be an object, `fields` a list")
        return await run_in_threadpool(
            lambda: admin.start_training_encoder(
                project_id(project),
                [str(f) for f in fields],
                name=body.get("name"),
                options=options,
                patient_key=body.get("patient_key"),
                reembed=bool(body.get("reembed")),
            )
        )

    @app.post("/projects/{project}/retrain")
    async def retrain(project: str) -> dict[str, Any]:
        """Start one round of the self-improving loop now (see GET /jobs and
        GET /projects/{project}/encoder-selection for its record)."""
        admin: Admin = state["admin"]
        return await run_in_threadpool(admin.start_retraining, project_id(project))

    @app.post("/projects/{project}/rollback-encoder")
    async def rollback_encoder(project: str, encoder: str | None = None) -> dict[str, Any]:
        """Go back to the previous live encoder (or `encoder`), with zero downtime."""
        admin: Admin = state["admin"]
        return await run_in_threadpool(admin.start_rollback, project_id(project), encoder)

    @app.get("/projects/{project}/encoder-selection")
    async def encoder_selection(project: str) -> dict[str, Any]:
        """The live encoder, its lineage, and every retraining round: scores, decision, reason."""
        admin: Admin = state["admin"]
        return await run_in_threadpool(admin.selection, project_id(project))

    @app.post("/projects/{project}/preannotate")
    async def preannotate(project: int, refresh: bool = False) -> dict[str, Any]:
        """Start pushing predictions into Label Studio (or refreshing them); see GET /jobs."""
        admin: Admin = state["admin"]
        start = admin.start_refresh if refresh else admin.start_preannotate
        return await run_in_threadpool(start, project)

    @app.post("/projects/{project}/diverse-first")
    async def diverse_first(
        project: int, limit: int | None = None, clear: bool = False
    ) -> dict[str, Any]:
        """Start writing the diverse-first order into the tasks' data (or removing it)."""
        admin: Admin = state["admin"]
        return await run_in_threadpool(admin.start_diverse_first, project, limit, clear)

    @app.post("/train")
    async def train(request: Request) -> dict[str, Any]:
        """Label Studio's "Start Training" (without its START_TRAINING webhook flag)."""
        body = await _json_object(request)
        return await run_in_threadpool(_start_training, body.get("project"))

    def _start_training(project: object) -> dict[str, Any]:
        admin: Admin = state["admin"]
        return admin.start_reembed(project_id(project), settings.encoder)

    @app.post("/webhook")
    async def webhook(request: Request) -> dict[str, Any]:
        body = await _json_object(request)
        action = body.get("action")
        if not isinstance(action, str) or not action:
            raise RequestError(422, "bad_request", "webhook body has no `action`")
        if action == "START_TRAINING":
            return await run_in_threadpool(_start_training, body.get("project"))
        if action not in LABEL_EVENTS | DELETE_EVENTS | PREEMBED_EVENTS:
            return {"status": "ignored", "action": action}
        if body.get("project") is None:
            raise RequestError(422, "bad_request", f"{action} webhook without `project`")
        inbox: WebhookInbox = state["inbox"]
        return {"status": "queued", "id": inbox.put(body)}

    return app


async def _json_object(request: Request) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(413, "too_large", f"request body over {MAX_BODY_BYTES} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise RequestError(413, "too_large", f"request body over {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(
            400, "malformed_json", f"request body is not valid JSON: {exc}"
        ) from None
    if not isinstance(body, dict):
        raise RequestError(422, "bad_request", "request body must be a JSON object")
    return body


def _config(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise RequestError(422, "bad_request", f"`{key}` must be the label config XML as text")
    return value


def _status_of(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, RequestError):
        return exc.status, exc.reason
    if isinstance(exc, ImageError):
        return exc.status, exc.reason
    if isinstance(exc, (LabelConfigError, TaskError)):
        return 422, "bad_label_config" if isinstance(exc, LabelConfigError) else "bad_task"
    if isinstance(exc, DimensionMismatchError):
        return 409, "encoder_mismatch"
    if isinstance(exc, (StoreError, EncoderError)):
        return 503, "unavailable"
    return 500, "internal_error"


class BasicAuth:
    """Basic auth on every HTTP request, as plain ASGI: Starlette's `BaseHTTPMiddleware` runs
    each request's body and response through task-group streams, about 0.25 ms a request
    here (`python -m bench.http_path`)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _authorised(Request(scope), self.settings):
            await self.app(scope, receive, send)
            return
        detail = "basic auth required"
        if scope["path"] == "/webhook":
            detail += (
                ": Label Studio sends the webhook it created for this backend without "
                "credentials; add an `Authorization: Basic ...` header to it (project "
                "Settings → Webhooks → Headers) or connect it with `echolabel connect`"
            )
        refusal = JSONResponse(
            {"error": "unauthorized", "detail": detail},
            status_code=401,
            headers={"WWW-Authenticate": 'Basic realm="echolabel"'},
        )
        await refusal(scope, receive, send)


def _authorised(request: Request, settings: Settings) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        return False
    # No charset is agreed (RFC 7617): Label Studio's requests sends latin-1, browsers UTF-8.
    try:
        decoded = raw.decode()
    except UnicodeDecodeError:
        decoded = raw.decode("latin-1")
    user, _, password = decoded.partition(":")
    # compare_digest takes non-ASCII only as bytes.
    return secrets.compare_digest(user.encode(), (settings.basic_auth_user or "").encode()) and (
        secrets.compare_digest(password.encode(), (settings.basic_auth_pass or "").encode())
    )
