"""The review pages in the browser: the neighbour gallery, thumbnails, near-duplicate pairs
and the admin page.

They show medical images and start jobs, so they are served without a login only while the
backend listens on loopback: beyond it, basic auth (BASIC_AUTH_USER/PASS, enforced for every
endpoint by the app's middleware) is required and they answer 403 without it. Forms are
protected against CSRF; nothing changes state on GET.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import parse_qsl, quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from echolabel.core.errors import PermanentJobError
from echolabel.core.model import SimilarityModel
from echolabel.core.projects import project_id
from echolabel.core.runtime import Runtime
from echolabel.settings import Settings
from workers.catalogue import job_spec
from workers.runtime import run_here

from . import admin_page
from .admin import Admin
from .csrf import CsrfError, CsrfTokens
from .duplicates_page import render_duplicates
from .gallery import TaskNotFound, build_gallery, image_ref, render_gallery
from .thumbnails import ThumbnailCache

MAX_FORM_BYTES = 16 * 1024
_HEADERS = {"X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff"}


def is_loopback(host: str | None) -> bool:
    """Whether a listen address is reachable only from this machine (unknown: no)."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def review_router(state: dict[str, Any], settings: Settings, listen_host: str | None) -> APIRouter:
    """The pages' routes; `state` holds the app's runtime and admin once it has started."""
    csrf = CsrfTokens()
    user = settings.basic_auth_user or ""

    def guard() -> None:
        # With basic auth configured the middleware has already checked the credentials.
        if not settings.basic_auth_user and not is_loopback(listen_host):
            raise PageRefused(
                f"the review and admin pages show images and start jobs: the backend listens "
                f"on {listen_host or 'an unknown address'}, beyond loopback, without basic "
                "auth. Set BASIC_AUTH_USER and BASIC_AUTH_PASS, or serve with --host 127.0.0.1"
            )

    router = APIRouter(dependencies=[Depends(guard)])

    def runtime() -> Runtime:
        return state["runtime"]

    def thumbnails() -> ThumbnailCache:
        if "thumbnails" not in state:
            state["thumbnails"] = ThumbnailCache(
                settings.model_dir / "thumbnails",
                runtime().fetcher,
                settings.thumbnail_cache_bytes,
            )
        return state["thumbnails"]

    @router.get("/projects/{project}/tasks/{task:path}/neighbours", response_model=None)
    async def neighbours(project: str, task: str, request: Request) -> Response:
        """The task's labelled neighbours and their vote: HTML, or JSON when asked for."""
        model = SimilarityModel(runtime(), project_id(project))
        try:
            gallery = await run_in_threadpool(build_gallery, model, task)
        except TaskNotFound as exc:
            return JSONResponse({"error": "not_found", "detail": str(exc)}, status_code=404)
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse(gallery)
        return HTMLResponse(render_gallery(gallery), headers=_HEADERS)

    @router.get("/projects/{project}/tasks/{task:path}/thumbnail", response_model=None)
    async def thumbnail(project: str, task: str) -> Response:
        """The task's image, small: fetched by the backend's ImageFetcher, cached on disk."""
        model = SimilarityModel(runtime(), project_id(project))
        try:
            ref = await run_in_threadpool(image_ref, model, task)
        except TaskNotFound as exc:
            return JSONResponse({"error": "not_found", "detail": str(exc)}, status_code=404)
        data = await run_in_threadpool(thumbnails().get, ref)
        return Response(
            data,
            media_type="image/jpeg",
            headers={"Cache-Control": "private, max-age=3600", **_HEADERS},
        )

    @router.get("/projects/{project}/duplicates", response_model=None)
    async def duplicates(
        project: str, request: Request, threshold: float | None = None
    ) -> Response:
        """The project's near-duplicate pairs side by side: HTML, or JSON when asked for."""
        if threshold is not None and not -1.0 <= threshold <= 1.0:
            return JSONResponse(
                {"error": "bad_request", "detail": f"threshold {threshold} is not a cosine"},
                status_code=422,
            )
        # The catalogue's job, run here on the backend's runtime: the page shows its result
        # now, so it is never queued (`echolabel duplicates --project` may queue it).
        arguments = {"project": project_id(project), "threshold": threshold}
        try:
            result = await run_in_threadpool(run_here, runtime(), job_spec("duplicates"), arguments)
        except PermanentJobError as exc:
            return JSONResponse({"error": "not_found", "detail": str(exc)}, status_code=404)
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse(result)
        return HTMLResponse(render_duplicates(result), headers=_HEADERS)

    @router.get("/admin", response_class=HTMLResponse)
    async def admin_home(started: str = "") -> HTMLResponse:
        projects = await run_in_threadpool(admin_page.project_summaries, runtime())
        rows = await run_in_threadpool(_job_rows)
        message = f"started job {started}" if started else ""
        html = admin_page.render_admin(projects, rows, settings, csrf.issue(user), message)
        return HTMLResponse(html, headers={"Cache-Control": "no-store", **_HEADERS})

    def _job_rows() -> list[dict[str, Any]]:
        return admin_page.job_rows(admin().jobs(), settings.artefacts)

    def admin() -> Admin:
        return state["admin"]

    @router.get("/admin/jobs")
    async def admin_jobs() -> JSONResponse:
        """What the admin page polls: every job, and its rows formatted for the table."""
        jobs = await run_in_threadpool(admin().jobs)
        rows = admin_page.job_rows(jobs, settings.artefacts)
        return JSONResponse({"jobs": jobs, "rows": rows}, headers={"Cache-Control": "no-store"})

    @router.get("/admin/projects")
    async def admin_projects() -> JSONResponse:
        projects = await run_in_threadpool(admin_page.project_summaries, runtime())
        return JSONResponse({"projects": projects}, headers={"Cache-Control": "no-store"})

    @router.post("/admin/projects/{project}/{action}", response_model=None)
    async def admin_action(project: str, action: str, request: Request) -> Response:
        """A form of the admin page: starts a job through Admin, then back to the page."""
        form = await _form(request)
        try:
            csrf.check(request, form.get("csrf"), user)
        except CsrfError as exc:
            return JSONResponse({"error": "csrf", "detail": str(exc)}, status_code=403)
        chosen = admin_page.ACTIONS.get(action)
        if chosen is None:
            known = ", ".join(admin_page.ACTIONS)
            return JSONResponse(
                {"error": "not_found", "detail": f"no action {action!r} (known: {known})"},
                status_code=404,
            )
        try:
            values = admin_page.form_values(chosen, settings, form)
        except ValueError as exc:
            return JSONResponse({"error": "bad_request", "detail": str(exc)}, status_code=422)
        started = await run_in_threadpool(chosen.start, admin(), project_id(project), values)
        return RedirectResponse(f"/admin?started={quote(str(started['job']))}", status_code=303)

    @router.get("/admin/{kind}/{project}/{stamp}/{name}", response_model=None)
    async def admin_report(kind: str, project: str, stamp: str, name: str) -> Response:
        """An evaluation report or a label-QA result, read-only."""
        path = admin_page.report_file(settings.artefacts, kind, project_id(project), stamp, name)
        if path is None:
            return JSONResponse({"error": "not_found", "detail": "no such report"}, status_code=404)
        return FileResponse(path, headers={"X-Content-Type-Options": "nosniff"})

    return router


class PageRefused(Exception):
    """The pages are not served on this address without basic auth."""


async def refused(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": "forbidden", "detail": str(exc)}, status_code=403)


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body (small; python-multipart is not needed for it)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return {}
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
