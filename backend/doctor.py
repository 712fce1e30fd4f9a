"""`echolabel doctor`: check a set-up step by step and say what to fix.

Connecting a backend to Label Studio fails in quiet ways (a backend shown as Connected without
its webhook, a token of the wrong kind, images answering 401). Each check here names what it
found and, when it fails, the fix; checks that depend on a failed one are skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import httpx

from echolabel.images import ImageError, ImageFetcher
from echolabel.labelstudio import LabelStudioClient, LabelStudioError
from echolabel.labelstudio_auth import LabelStudioAuthError
from echolabel.settings import Settings
from vectorstore import StoreError
from workers.encoders import EncoderError, load_encoder

from .label_config import LabelConfigError, LabelSchema, TaskError, parse_label_config

Store = object  # QdrantStore | ExactSearchStore: only collection() and count() are used


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: skipped (something it depends on failed or is not configured)
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = {True: "✓", False: "✗", None: "–"}[self.ok]
        text = f"{mark} {self.name}: {self.detail}"
        return text + (f"\n    fix: {self.fix}" if self.fix and self.ok is False else "")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class Doctor:
    """Runs the checks for one configuration; `store` opens the vector store on demand (the
    CLI cannot open the embedded one while the backend holds it: then /doctor can)."""

    def __init__(
        self,
        settings: Settings,
        store: Callable[[], Store] | None = None,
        load_weights: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings
        self._store = store
        self._load_weights = load_weights or (
            lambda: load_encoder(
                settings.encoder,
                weights_dir=settings.weights_dir,
                encoders_dir=settings.encoders_dir,
            )
        )
        self.checks: list[Check] = []

    @property
    def healthy(self) -> bool:
        return all(check.ok is not False for check in self.checks)

    def add(self, name: str, ok: bool | None, detail: str, fix: str = "") -> bool | None:
        self.checks.append(Check(name, ok, detail, fix))
        return ok

    def run(self, project: int | None = None, backend_url: str | None = None) -> list[Check]:
        settings = self.settings
        self.add(
            "configuration",
            True,
            f"encoder {settings.encoder}, data in {settings.model_dir}, store "
            + (f"server {settings.qdrant_url}" if settings.qdrant_url else "embedded"),
        )
        self._weights()
        self._redis()
        client = self._label_studio()
        if project is not None:
            self._project(client, project, backend_url)
        if client is not None:
            client.close()
        return self.checks

    def _weights(self) -> None:
        try:
            encoder = self._load_weights()
        except EncoderError as exc:
            lines = str(exc).splitlines()
            self.add(
                "encoder weights",
                False,
                lines[0],
                fix=" ".join(line.strip() for line in lines[1:]) or "check ECHOLABEL_ENCODER",
            )
            return
        self.add(
            "encoder weights",
            True,
            f"{self.settings.encoder} loads (weights {getattr(encoder, 'weights_id', '?')})",
        )

    def _redis(self) -> None:
        if not self.settings.redis_url:
            self.add("redis", None, "not configured: embedding runs in the backend")
            return
        from workers.queues import connect

        try:
            connect(self.settings.redis_url).ping()
        except Exception as exc:
            self.add(
                "redis",
                False,
                f"{self.settings.redis_url} does not answer ({type(exc).__name__})",
                fix="start Redis, or unset REDIS_URL (the backend then embeds inline)",
            )
            return
        self.add("redis", True, f"{self.settings.redis_url} answers")

    def _label_studio(self) -> LabelStudioClient | None:
        url = self.settings.label_studio_url
        if not url:
            self.add(
                "label studio",
                None,
                "LABEL_STUDIO_URL is not set: only local files and allow-listed hosts serve images",
            )
            return None
        try:
            answer = httpx.get(f"{url}/health", timeout=self.settings.fetch_timeout_s)
            up = answer.status_code == 200
        except httpx.HTTPError as exc:
            up, answer = False, exc
        if not up:
            self.add(
                "label studio reachable",
                False,
                f"{url}/health: {answer}",
                fix="check LABEL_STUDIO_URL (as this machine reaches Label Studio, e.g. "
                "http://label-studio:8080 in docker compose) and that Label Studio runs",
            )
            return None
        self.add("label studio reachable", True, f"{url} answers")
        if not self.settings.label_studio_api_key:
            self.add(
                "api key",
                False,
                "LABEL_STUDIO_API_KEY is not set: images and projects answer 401",
                fix="copy a personal access token (Account & Settings) into LABEL_STUDIO_API_KEY",
            )
            return None
        try:
            client = LabelStudioClient(self.settings)
            user = client.whoami()
            kind = {"legacy": "legacy token"}.get(client.token_kind, "personal access token")
        except (LabelStudioError, LabelStudioAuthError) as exc:
            self.add(
                "api key",
                False,
                str(exc).split(": check")[0],
                fix="a personal access token (Account & Settings → Personal Access Token) "
                "works in every organisation; a legacy token only where the organisation "
                "enables legacy tokens (Organization → API Tokens Settings)",
            )
            return None
        self.add("api key", True, f"accepted: {kind} of {user.get('email') or user.get('id')}")
        return client

    def _project(
        self, client: LabelStudioClient | None, project: int, backend_url: str | None
    ) -> None:
        names = (
            "backend connected",
            "webhook",
            "label config",
            "sample image",
            "collection encoder",
            "tasks stored",
        )
        if client is None:
            for name in names:
                self.add(name, None, "skipped: Label Studio is not reachable with our key")
            return
        try:
            backends = client.backends(project)
            config = client.label_config(project)
        except LabelStudioError as exc:
            self.add("project", False, str(exc), fix="check the project id")
            return
        self._backends(client, project, backends, backend_url)
        schema = self._label_config(config)
        self._sample_image(client, project, schema)
        self._collection(project)

    def _backends(
        self,
        client: LabelStudioClient,
        project: int,
        backends: list[dict],
        backend_url: str | None,
    ) -> None:
        urls = [str(b.get("url", "")).rstrip("/") for b in backends]
        connect = f"echolabel connect --project {project} --backend-url {backend_url or 'URL'}"
        if backend_url:
            urls = [u for u in urls if u == backend_url.rstrip("/")]
        if not urls:
            self.add(
                "backend connected",
                False,
                f"project {project} has no ML backend"
                + (f" at {backend_url}" if backend_url else ""),
                fix=f"{connect} (or Settings → Model → Connect Model)",
            )
            self.add("webhook", None, "skipped: no backend")
            return
        self.add("backend connected", True, ", ".join(urls))
        hooks = {u: client.webhooks_to(project, u) for u in urls}
        missing = [u for u in urls if not hooks[u]]
        if missing:
            self.add(
                "webhook",
                False,
                f"no webhook to {missing[0]}/webhook: the backend shows Connected but never "
                "learns from annotations (Label Studio's SSRF protection refused the address "
                "when it was connected)",
                fix="start Label Studio with SSRF_PROTECTION_ENABLED=false and reconnect, or "
                f"add the webhook under Settings → Webhooks; then `{connect}`",
            )
            return
        if self.settings.basic_auth_user:
            unauthorised = [u for u in urls if not all(map(_has_authorization, hooks[u]))]
            if unauthorised:
                self.add(
                    "webhook",
                    False,
                    f"{unauthorised[0]}/webhook carries no basic auth: every annotation event "
                    "gets 401",
                    fix=connect,
                )
                return
        self.add("webhook", True, ", ".join(f"{u}/webhook" for u in urls))

    def _label_config(self, config: str) -> LabelSchema | None:
        try:
            schema = parse_label_config(config)
        except LabelConfigError as exc:
            self.add("label config", False, str(exc), fix="see README, Connecting")
            return None
        fields = ", ".join(f"{f.name} ({len(f.choices)})" for f in schema.fields)
        self.add("label config", True, f"image ${schema.image_key}; choices {fields}")
        return schema

    def _sample_image(
        self, client: LabelStudioClient, project: int, schema: LabelSchema | None
    ) -> None:
        if schema is None:
            self.add("sample image", None, "skipped: no usable label config")
            return
        task = next(iter(client.tasks(project)), None)
        if task is None:
            self.add("sample image", None, "the project has no tasks yet")
            return
        try:
            with ImageFetcher(self.settings) as fetcher:
                image = fetcher.load(schema.image_ref(task))
        except (ImageError, TaskError) as exc:
            self.add("sample image", False, f"task {task.get('id')}: {exc}")
            return
        self.add("sample image", True, f"task {task['id']}: {image.width}×{image.height}")

    def _collection(self, project: int) -> None:
        if self._store is None:
            self.add("collection encoder", None, "skipped: no store access here")
            return
        try:
            store = self._store()
            info = store.collection(project)  # type: ignore[attr-defined]
            embedded = store.count(project) if info else 0  # type: ignore[attr-defined]
            labelled = store.count(project, labelled=True) if info else 0  # type: ignore[attr-defined]
        except StoreError as exc:
            self.add(
                "collection encoder",
                None,
                f"skipped: {str(exc).split(':')[0]} (ask the running backend: GET /doctor)",
            )
            return
        if info is None:
            self.add("collection encoder", True, "no collection yet: created on first embedding")
        elif info.encoder != self.settings.encoder:
            self.add(
                "collection encoder",
                False,
                f"the project's vectors come from {info.encoder}, ECHOLABEL_ENCODER is "
                f"{self.settings.encoder}: new images would be refused (409)",
                fix=f"echolabel reembed --project {project} --encoder {self.settings.encoder}, "
                f"or set ECHOLABEL_ENCODER={info.encoder}",
            )
        else:
            self.add("collection encoder", True, f"{info.encoder}, generation {info.generation}")
        self.add("tasks stored", True, f"{embedded} embedded, {labelled} labelled")


def _has_authorization(hook: dict) -> bool:
    return "authorization" in {str(k).lower() for k in hook.get("headers") or {}}
