"""The little of Label Studio's REST API we read: a project's label config and its tasks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx

from echolabel.labelstudio_auth import LabelStudioAuth
from echolabel.settings import Settings

PAGE_SIZE = 100


class LabelStudioError(RuntimeError):
    """Label Studio could not be reached or refused; the message says what to check."""


class LabelStudioClient:
    def __init__(self, settings: Settings, client: httpx.Client | None = None) -> None:
        if not settings.label_studio_url or not settings.label_studio_api_key:
            raise LabelStudioError(
                "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set to read projects from "
                "Label Studio"
            )
        self.base_url = settings.label_studio_url
        self._client = client or httpx.Client(
            auth=LabelStudioAuth(settings.label_studio_url, settings.label_studio_api_key),
            timeout=settings.fetch_timeout_s,
        )

    def close(self) -> None:
        self._client.close()

    def _get(self, path: str, **params: object) -> Any:
        url = f"{self.base_url}{path}"
        try:
            response = self._client.get(url, params=params)
        except httpx.HTTPError as exc:
            raise LabelStudioError(
                f"Label Studio at {self.base_url} is unreachable: {exc}"
            ) from None
        if response.status_code in (401, 403):
            raise LabelStudioError(
                f"Label Studio refused {path} ({response.status_code}): check "
                "LABEL_STUDIO_API_KEY (a legacy token or a personal access token)"
            )
        if response.status_code == 404:
            raise LabelStudioError(f"Label Studio has no {path} (404): check the project id")
        if response.status_code >= 400:
            raise LabelStudioError(f"Label Studio answered {response.status_code} for {path}")
        return response.json()

    def label_config(self, project: int) -> str:
        return str(self._get(f"/api/projects/{project}/").get("label_config", ""))

    def tasks(self, project: int) -> Iterator[dict[str, Any]]:
        """Every task of the project, page by page."""
        page = 1
        while True:
            body = self._get("/api/tasks/", project=project, page=page, page_size=PAGE_SIZE)
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            yield from tasks
            total = body.get("total") if isinstance(body, dict) else None
            if len(tasks) < PAGE_SIZE or (total is not None and page * PAGE_SIZE >= total):
                return
            page += 1
