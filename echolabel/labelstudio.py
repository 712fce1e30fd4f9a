"""The part of Label Studio's REST API we use: read projects and tasks, set projects up.

Reads serve indexing and evaluation; the set-up calls (projects, local storage, import,
connecting a backend, annotations, predictions) serve `echolabel demo` and the end-to-end tests
against a real Label Studio.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from echolabel.labelstudio_auth import LabelStudioAuth
from echolabel.settings import Settings

PAGE_SIZE = 100
GET_RETRY_DELAYS_S = (0.5, 2.0)
PREDICT_ACTION_TIMEOUT_S = 130.0


class LabelStudioError(RuntimeError):
    """Label Studio could not be reached or refused; the message says what to check."""


class LabelStudioUnavailable(LabelStudioError):
    """Label Studio did not answer, or answered 5xx: worth retrying later."""


@dataclass(frozen=True)
class Connection:
    """What `LabelStudioClient.connect` found: the backend was connected before, and the
    project has its webhook (without it the backend never learns from new annotations)."""

    already_connected: bool
    webhook: bool


class LabelStudioClient:
    def __init__(self, settings: Settings, client: httpx.Client | None = None) -> None:
        if not settings.label_studio_url or not settings.label_studio_api_key:
            raise LabelStudioError(
                "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set to read projects from "
                "Label Studio"
            )
        self.base_url = settings.label_studio_url
        self._auth = LabelStudioAuth(settings.label_studio_url, settings.label_studio_api_key)
        self._client = client or httpx.Client(auth=self._auth, timeout=settings.fetch_timeout_s)

    @property
    def token_kind(self) -> str:
        """ "legacy" or "personal_access_token" (see echolabel.labelstudio_auth)."""
        return self._auth.token_kind

    def close(self) -> None:
        self._client.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        params: dict[str, object] | None = None,
        timeout: float | None = None,
    ) -> Any:
        url = f"{self.base_url}{path}"
        extra = {} if timeout is None else {"timeout": timeout}
        # Reads are retried on timeouts and 5xx; writes are not (the caller decides: a write
        # that timed out may have happened).
        delays = GET_RETRY_DELAYS_S if method == "GET" else ()
        for attempt in range(len(delays) + 1):
            try:
                response = self._client.request(method, url, json=json, params=params, **extra)
            except httpx.HTTPError as exc:
                failure = LabelStudioUnavailable(
                    f"Label Studio at {self.base_url} is unreachable ({method} {path}): {exc}"
                )
            else:
                if response.status_code < 500:
                    break
                failure = LabelStudioUnavailable(
                    f"Label Studio answered {response.status_code} for {method} {path}: "
                    f"{_detail(response)}"
                )
            if attempt == len(delays):
                raise failure
            time.sleep(delays[attempt])
        if response.status_code in (401, 403):
            raise LabelStudioError(
                f"Label Studio refused {method} {path} ({response.status_code}): check "
                f"LABEL_STUDIO_API_KEY (a legacy token or a personal access token); "
                f"{_detail(response)}"
            )
        if response.status_code == 404:
            raise LabelStudioError(f"Label Studio has no {path} (404): check the project id")
        if response.status_code >= 400:
            raise LabelStudioError(
                f"Label Studio answered {response.status_code} for {method} {path}: "
                f"{_detail(response)}"
            )
        return response.json() if response.content else None

    def _get(self, path: str, **params: object) -> Any:
        return self._request("GET", path, params=params)

    def whoami(self) -> dict[str, Any]:
        """The user our token belongs to (proves the token is accepted)."""
        return dict(self._get("/api/current-user/whoami"))

    def label_config(self, project: int) -> str:
        return str(self._get(f"/api/projects/{project}/").get("label_config", ""))

    def tasks(
        self, project: int, full: bool = False, resolve_uri: bool = True
    ) -> Iterator[dict[str, Any]]:
        """Every task of the project, page by page; `full` adds annotations and predictions.
        `resolve_uri=False`: the task data as stored (cloud storage URIs not turned into
        Label Studio's proxy URLs), the only data fit to write back."""
        page = 1
        extra: dict[str, str] = {"fields": "all"} if full else {}
        if not resolve_uri:
            extra["resolve_uri"] = "false"
        while True:
            body = self._get(
                "/api/tasks/", project=project, page=page, page_size=PAGE_SIZE, **extra
            )
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            yield from tasks
            total = body.get("total") if isinstance(body, dict) else None
            if len(tasks) < PAGE_SIZE or (total is not None and page * PAGE_SIZE >= total):
                return
            page += 1

    # Set-up calls (demo and end-to-end tests).

    def create_project(self, title: str, label_config: str) -> int:
        body = {"title": title, "label_config": label_config}
        return int(self._request("POST", "/api/projects/", json=body)["id"])

    def add_local_storage(self, project: int, path: str) -> int:
        """Let the project's tasks read files under `path` (inside LOCAL_FILES_DOCUMENT_ROOT)."""
        body = {"project": project, "path": path, "title": "images", "use_blob_urls": True}
        return int(self._request("POST", "/api/storages/localfiles/", json=body)["id"])

    def import_tasks(self, project: int, tasks: list[dict[str, Any]]) -> list[int]:
        """Import task data objects; the new task ids in import order."""
        answer = self._request(
            "POST",
            f"/api/projects/{project}/import",
            json=tasks,
            params={"return_task_ids": "true"},
        )
        return [int(task_id) for task_id in answer["task_ids"]]

    def connect_backend(
        self,
        project: int,
        url: str,
        title: str,
        basic_auth: tuple[str, str] | None = None,
    ) -> int:
        """Add an ML backend to the project; Label Studio checks /health and /setup first.

        Label Studio also creates the backend's webhook, but sends it without the backend's
        basic auth: with `basic_auth` the webhook gets the Authorization header added, else
        the backend would refuse every annotation event and never learn.
        """
        body: dict[str, Any] = {
            "url": url,
            "project": project,
            "title": title,
            "is_interactive": False,
        }
        if basic_auth:
            body |= {
                "auth_method": "BASIC_AUTH",
                "basic_auth_user": basic_auth[0],
                "basic_auth_pass": basic_auth[1],
            }
        backend = int(self._request("POST", "/api/ml", json=body)["id"])
        if basic_auth:
            self.authorise_webhooks(project, url, basic_auth)
        return backend

    def connect(
        self,
        project: int,
        url: str,
        title: str,
        basic_auth: tuple[str, str] | None = None,
    ) -> Connection:
        """Connect the backend at `url` to the project unless it already is (then only its
        webhooks get the basic auth), and say whether the webhook that teaches it exists."""
        url = url.rstrip("/")
        already = any(b.get("url", "").rstrip("/") == url for b in self.backends(project))
        if not already:
            self.connect_backend(project, url, title, basic_auth=basic_auth)
        elif basic_auth:
            self.authorise_webhooks(project, url, basic_auth)
        return Connection(already_connected=already, webhook=bool(self.webhooks_to(project, url)))

    def authorise_webhooks(self, project: int, url: str, basic_auth: tuple[str, str]) -> int:
        """Add basic auth to the project's webhooks that point at the backend at `url`."""
        header = {"Authorization": basic_auth_header(*basic_auth)}
        hooks = self.webhooks_to(project, url)
        if not hooks:
            raise LabelStudioError(
                f"project {project} has no webhook to {webhook_url(url)}: Label Studio creates "
                "it when the "
                "backend is connected unless SSRF protection refused the address "
                "(set SSRF_PROTECTION_ENABLED=false or add it under Settings → Webhooks)"
            )
        for hook in hooks:
            headers = dict(hook.get("headers") or {}) | header
            self._request("PATCH", f"/api/webhooks/{hook['id']}/", json={"headers": headers})
        return len(hooks)

    def backends(self, project: int) -> list[dict[str, Any]]:
        """The ML backends connected to the project."""
        return list(self._get("/api/ml", project=project))

    def webhooks(self, project: int) -> list[dict[str, Any]]:
        return list(self._get("/api/webhooks/", project=project))

    def webhooks_to(self, project: int, backend_url: str) -> list[dict[str, Any]]:
        """The project's webhooks to the backend at `backend_url` (the one Label Studio
        creates when the backend is connected, unless its SSRF protection refused it)."""
        target = webhook_url(backend_url)
        return [hook for hook in self.webhooks(project) if hook.get("url") == target]

    def annotate(self, task: int, result: list[dict[str, Any]]) -> int:
        answer = self._request("POST", f"/api/tasks/{task}/annotations/", json={"result": result})
        return int(answer["id"])

    def retrieve_predictions(self, project: int, tasks: list[int]) -> None:
        """The Data Manager's "Retrieve Predictions" action on `tasks` (one /predict call)."""
        self._request(
            "POST",
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project},
            json={"selectedItems": {"all": False, "included": tasks}},
            # Label Studio waits up to ML_TIMEOUT_PREDICT (100 s) for the backend's /predict.
            timeout=PREDICT_ACTION_TIMEOUT_S,
        )

    def predictions(self, task: int) -> list[dict[str, Any]]:
        return list(self._get("/api/predictions/", task=task))

    # Predictions (the pre-annotation push).

    def project(self, project: int) -> dict[str, Any]:
        return dict(self._get(f"/api/projects/{project}/"))

    def import_predictions(self, project: int, predictions: list[dict[str, Any]]) -> int:
        """Create predictions in bulk (`task`, `result`, `score`, `model_version` each)."""
        answer = self._request(
            "POST", f"/api/projects/{project}/import/predictions", json=predictions
        )
        return int(answer.get("created", 0))

    def update_prediction(self, prediction: int, result: list[Any], score: float) -> None:
        self._request(
            "PATCH", f"/api/predictions/{prediction}/", json={"result": result, "score": score}
        )

    def delete_prediction(self, prediction: int) -> None:
        self._request("DELETE", f"/api/predictions/{prediction}/")

    def model_versions(self, project: int) -> dict[str, int]:
        """Prediction count per model_version in the project."""
        return {
            str(k): int(v) for k, v in self._get(f"/api/projects/{project}/model-versions/").items()
        }

    def delete_model_version(self, project: int, version: str) -> int:
        answer = self._request(
            "DELETE", f"/api/projects/{project}/model-versions/", json={"model_version": version}
        )
        return int((answer or {}).get("deleted_predictions", 0))

    def set_model_version(self, project: int, version: str) -> None:
        """The project's model_version: which predictions annotators are shown."""
        self._request("PATCH", f"/api/projects/{project}/", json={"model_version": version})

    def update_task_data(self, task: int, data: dict[str, Any]) -> None:
        """Replace a task's data (Label Studio keeps no other copy: send all of it)."""
        self._request("PATCH", f"/api/tasks/{task}/", json={"data": data})

    def create_personal_access_token(self) -> str:
        """A new personal access token (JWT refresh token) of the authenticated user."""
        return str(self._request("POST", "/api/token/")["token"])


def webhook_url(backend_url: str) -> str:
    """Where Label Studio sends a connected backend's events."""
    return backend_url.rstrip("/") + "/webhook"


def basic_auth_header(user: str, password: str) -> str:
    """`Basic ...` as Label Studio's own client (requests) sends it: latin-1 when it fits."""
    raw = f"{user}:{password}"
    try:
        encoded = raw.encode("latin-1")
    except UnicodeEncodeError:
        encoded = raw.encode()
    return "Basic " + base64.b64encode(encoded).decode()


def _detail(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    return text[:300] if text else "(empty body)"
