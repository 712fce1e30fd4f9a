"""`echolabel doctor`: check a set-up step by step and say what to fix.

Connecting a backend to Label Studio fails in quiet ways (a backend shown as Connected without
its webhook, a token of the wrong kind, images answering 401). Each check here names what it
found and, when it fails, the fix; checks that depend on a failed one are skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import httpx

from echolabel.core.runtime import Runtime
from echolabel.encoders import EncoderError
from echolabel.images import ImageError
from echolabel.label_config import LabelConfigError, LabelSchema, TaskError, parse_label_config
from echolabel.labelstudio import LabelStudioClient, LabelStudioError
from echolabel.labelstudio_auth import LabelStudioAuthError
from vectorstore import StoreError


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


@dataclass(frozen=True)
class Trouble:
    """One way a check fails, as a user meets it; docs/troubleshooting.md's table is generated
    from these (`echolabel doctor --troubleshooting`), so the table and the CLI's fixes never drift.

    `fix` is a `str.format` template over {project}, {backend_url}, {encoder} and {found}.
    """

    check: str
    fails_when: str
    looks_like: str
    fix: str

    def fix_for(self, **values: object) -> str:
        return self.fix.format_map(_Placeholders(values))


class _Placeholders(dict):
    """Missing template values read as generic names (N, URL, NAME), as the docs show them."""

    def __missing__(self, key: str) -> str:
        return {"project": "N", "backend_url": "URL", "encoder": "NAME", "found": "OTHER"}[key]


BAD_CONFIGURATION = Trouble(
    "configuration",
    "an environment variable has a bad value (e.g. `ECHOLABEL_TOP_K=ten`)",
    "the backend does not start, so Label Studio cannot connect to it",
    "correct the variable the message names (docs/configuration.md)",
)
WEIGHTS_MISSING = Trouble(
    "encoder weights",
    "the configured encoder's weights are not on disk (they are never downloaded at run time)",
    "*Retrieve Predictions* adds none; `/predict` answers 503 `unavailable` naming the file",
    "`echolabel weights download {encoder} --dir D` on a machine with internet, copy D here and "
    "set ECHOLABEL_WEIGHTS_DIR=D (or use the default efficientnet_lite0, whose weights ship "
    "with the install)",
)
REDIS_DOWN = Trouble(
    "redis",
    "`REDIS_URL` is set but Redis does not answer",
    "nothing breaks: the backend embeds inline (slower) and logs a warning once a minute",
    "start Redis, or unset REDIS_URL (the backend then embeds inline)",
)
QDRANT_DOWN = Trouble(
    "qdrant",
    "`QDRANT_URL` is set but the server does not answer, or refuses `QDRANT_API_KEY`",
    "no predictions: `/predict` answers 503 `unavailable` naming QDRANT_URL; annotation "
    "webhooks wait in order and are applied once it answers",
    "start the Qdrant server (`docker compose up -d qdrant`), or correct QDRANT_URL / "
    "QDRANT_API_KEY; unset QDRANT_URL for the embedded store under MODEL_DIR",
)
LABEL_STUDIO_DOWN = Trouble(
    "label studio reachable",
    "`LABEL_STUDIO_URL` is wrong, or Label Studio is down",
    "tasks get no prediction: their images cannot be fetched (502 `unreachable` per task)",
    "set LABEL_STUDIO_URL as this machine reaches Label Studio (e.g. http://label-studio:8080 "
    "in docker compose) and check that Label Studio runs",
)
KEY_REFUSED = Trouble(
    "api key",
    "`LABEL_STUDIO_API_KEY` is missing, wrong or expired, or is a legacy token where the "
    "organisation disabled legacy tokens",
    "tasks get no prediction; the backend's reply names `unauthorized` (401) for their images",
    "set LABEL_STUDIO_API_KEY to a personal access token (Account & Settings → Personal Access "
    "Token): it works in every organisation; a legacy token works only where the organisation "
    "enables legacy tokens (Organization → API Tokens Settings)",
)
NO_PROJECT = Trouble(
    "project",
    "the project does not exist or the token's user cannot see it",
    "–",
    "check --project: the number in the project's URL (`/projects/N/`)",
)
NOT_CONNECTED = Trouble(
    "backend connected",
    "the project has no ML backend at the backend's URL",
    "Settings → Model lists no model (or another one); no predictions appear",
    "`echolabel connect --project {project} --backend-url {backend_url}` (or Settings → Model → "
    "Connect Model)",
)
WEBHOOK_MISSING = Trouble(
    "webhook",
    "connected, but Label Studio holds no webhook to `<backend>/webhook`: its SSRF protection "
    "refused the address when the backend was connected",
    "the model shows *Connected*, yet suggestions never improve as you annotate",
    "start Label Studio with SSRF_PROTECTION_ENABLED=false and reconnect, or add the webhook "
    "under Settings → Webhooks; then `echolabel connect --project {project} --backend-url "
    "{backend_url}` checks it",
)
WEBHOOK_UNAUTHORISED = Trouble(
    "webhook",
    "the backend requires basic auth but its webhook carries no `Authorization` header",
    "the same: *Connected*, never learning (every annotation event gets 401)",
    "`echolabel connect --project {project} --backend-url {backend_url}` adds the header (by "
    "hand: Settings → Webhooks → Headers)",
)
BAD_LABEL_CONFIG = Trouble(
    "label config",
    "no `<Image>`, no `<Choices>` bound to it, or choices bound to two images",
    'connecting the model fails: "doesn\'t look like a valid ML backend … 422" (our `/setup` '
    "answer names what to add)",
    "one `<Image>` and at least one `<Choices toName=...>` bound to it (README, Connecting)",
)
IMAGE_UNREADABLE = Trouble(
    "sample image",
    "the first task's image cannot be fetched with our credentials (401: the token kind; 404 "
    "for local files: no Local Files storage; a host not allowed)",
    "tasks get no prediction; the backend's reply names the error per task",
    "the error's own hint: the token kind, LOCAL_FILES_SERVING_ENABLED=true and a Local Files "
    "storage covering the folder, or ECHOLABEL_IMAGE_ALLOWED_HOSTS",
)
ENCODER_MISMATCH = Trouble(
    "collection encoder",
    "the project's vectors come from another encoder than `ECHOLABEL_ENCODER`",
    "new tasks get no prediction (409 `encoder_mismatch`); tasks embedded before still do",
    "`echolabel reembed --project {project} --encoder {encoder}`, or set ECHOLABEL_ENCODER={found}",
)
TROUBLES = (
    BAD_CONFIGURATION,
    WEIGHTS_MISSING,
    REDIS_DOWN,
    QDRANT_DOWN,
    LABEL_STUDIO_DOWN,
    KEY_REFUSED,
    NO_PROJECT,
    NOT_CONNECTED,
    WEBHOOK_MISSING,
    WEBHOOK_UNAUTHORISED,
    BAD_LABEL_CONFIG,
    IMAGE_UNREADABLE,
    ENCODER_MISMATCH,
)


def troubleshooting_markdown() -> str:
    """docs/troubleshooting.md's table, one row per way a check fails, in the order they run."""
    rows = [
        "| check | fails when | what you see in Label Studio | fix |",
        "|---|---|---|---|",
    ]
    rows += [f"| {t.check} | {t.fails_when} | {t.looks_like} | {t.fix_for()} |" for t in TROUBLES]
    return "\n".join(rows) + "\n"


class Doctor:
    """Runs the checks for one configuration with the process's runtime: the encoder and the
    image fetcher predictions use, and its store, opened only when a check asks (the CLI
    cannot open the embedded one while the backend holds it: then /doctor can)."""

    def __init__(self, runtime: Runtime) -> None:
        self.settings = runtime.settings
        self._runtime = runtime
        self.checks: list[Check] = []

    @property
    def healthy(self) -> bool:
        return all(check.ok is not False for check in self.checks)

    def add(self, name: str, ok: bool | None, detail: str, fix: str = "") -> bool | None:
        self.checks.append(Check(name, ok, detail, fix))
        return ok

    def fail(self, trouble: Trouble, detail: str, **values: object) -> None:
        self.add(trouble.check, False, detail, fix=trouble.fix_for(**values))

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
        self._qdrant()
        client = self._label_studio()
        if project is not None:
            self._project(client, project, backend_url)
        if client is not None:
            client.close()
        return self.checks

    def _weights(self) -> None:
        try:
            encoder = self._runtime.embedder.encoder(self.settings.encoder)
        except EncoderError as exc:
            self.fail(WEIGHTS_MISSING, str(exc).splitlines()[0], encoder=self.settings.encoder)
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
            self.fail(
                REDIS_DOWN, f"{self.settings.redis_url} does not answer ({type(exc).__name__})"
            )
            return
        self.add("redis", True, f"{self.settings.redis_url} answers")

    def _qdrant(self) -> None:
        url = self.settings.qdrant_url
        if not url:
            self.add("qdrant", None, "not configured: the embedded store under MODEL_DIR")
            return
        key = self.settings.qdrant_api_key
        try:
            answer = httpx.get(
                f"{url.rstrip('/')}/collections",
                headers={"api-key": key} if key else {},
                timeout=self.settings.fetch_timeout_s,
            )
        except httpx.HTTPError as exc:
            self.fail(QDRANT_DOWN, f"{url} does not answer ({type(exc).__name__})")
            return
        if answer.status_code in (401, 403):
            state = "refused QDRANT_API_KEY" if key else "needs QDRANT_API_KEY"
            self.fail(QDRANT_DOWN, f"{url} {state} ({answer.status_code})")
        elif answer.status_code != 200:
            self.fail(QDRANT_DOWN, f"{url}/collections answered {answer.status_code}")
        else:
            count = len(answer.json().get("result", {}).get("collections", []))
            self.add("qdrant", True, f"{url} answers ({count} collections)")

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
            self.fail(LABEL_STUDIO_DOWN, f"{url}/health: {answer}")
            return None
        self.add("label studio reachable", True, f"{url} answers")
        if not self.settings.label_studio_api_key:
            self.fail(
                KEY_REFUSED, "LABEL_STUDIO_API_KEY is not set: images and projects answer 401"
            )
            return None
        try:
            client = LabelStudioClient(self.settings)
            user = client.whoami()
            kind = {"legacy": "legacy token"}.get(
                client.token_kind, "personal access token (exchanged for an access token)"
            )
        except (LabelStudioError, LabelStudioAuthError) as exc:
            self.fail(KEY_REFUSED, str(exc).split(": check")[0])
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
            self.fail(NO_PROJECT, str(exc))
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
        where = {"project": project, "backend_url": backend_url or "URL"}
        if backend_url:
            urls = [u for u in urls if u == backend_url.rstrip("/")]
        if not urls:
            self.fail(
                NOT_CONNECTED,
                f"project {project} has no ML backend"
                + (f" at {backend_url}" if backend_url else ""),
                **where,
            )
            self.add("webhook", None, "skipped: no backend")
            return
        self.add("backend connected", True, ", ".join(urls))
        hooks = {u: client.webhooks_to(project, u) for u in urls}
        missing = [u for u in urls if not hooks[u]]
        if missing:
            self.fail(
                WEBHOOK_MISSING,
                f"no webhook to {missing[0]}/webhook: the backend shows Connected but never "
                "learns from annotations",
                **where,
            )
            return
        if self.settings.basic_auth_user:
            unauthorised = [u for u in urls if not all(map(_has_authorization, hooks[u]))]
            if unauthorised:
                self.fail(
                    WEBHOOK_UNAUTHORISED,
                    f"{unauthorised[0]}/webhook carries no basic auth: every annotation event "
                    "gets 401",
                    **where,
                )
                return
        self.add("webhook", True, ", ".join(f"{u}/webhook" for u in urls))

    def _label_config(self, config: str) -> LabelSchema | None:
        try:
            schema = parse_label_config(config)
        except LabelConfigError as exc:
            self.fail(BAD_LABEL_CONFIG, str(exc))
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
            image = self._runtime.fetcher.load(schema.image_ref(task))
        except (ImageError, TaskError) as exc:
            self.fail(IMAGE_UNREADABLE, f"task {task.get('id')}: {exc}")
            return
        self.add("sample image", True, f"task {task['id']}: {image.width}×{image.height}")

    def _collection(self, project: int) -> None:
        try:
            store = self._runtime.store
            info = store.collection(project)
            embedded = store.count(project) if info else 0
            labelled = store.count(project, labelled=True) if info else 0
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
            self.fail(
                ENCODER_MISMATCH,
                f"the project's vectors come from {info.encoder}, ECHOLABEL_ENCODER is "
                f"{self.settings.encoder}: new images would be refused (409)",
                project=project,
                encoder=self.settings.encoder,
                found=info.encoder,
            )
        else:
            self.add("collection encoder", True, f"{info.encoder}, generation {info.generation}")
        self.add("tasks stored", True, f"{embedded} embedded, {labelled} labelled")


def _has_authorization(hook: dict) -> bool:
    return "authorization" in {str(k).lower() for k in hook.get("headers") or {}}
