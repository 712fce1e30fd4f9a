"""One settings object, read once from the environment and validated with clear messages.

Names follow Label Studio's ML-backend conventions where they exist (`LABEL_STUDIO_URL`,
`LABEL_STUDIO_API_KEY`, `BASIC_AUTH_USER`, `MODEL_DIR`); the rest are prefixed `ECHOLABEL_`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# How images are decoded for the encoders (echolabel/images.py `decode_image`: a JPEG reduced
# in libjpeg's DCT towards the encoder's input side, any mode to 8-bit RGB). Recorded with each
# collection: change it when that behaviour changes, and vectors made before are refused until
# the project is re-embedded.
DECODE_MODE = "reduced-to-input-side"


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    label_studio_url: str | None = None
    label_studio_api_key: str | None = None
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    model_dir: Path = Path("./data")
    # Trained encoders, evaluation reports and label-QA outputs. Every process that writes or
    # serves them must see this folder: compose mounts one volume here on the backend and on
    # every worker. Default: MODEL_DIR (one process, or one machine).
    artefacts_dir: Path | None = None
    weights_dir: Path | None = None
    redis_url: str | None = None
    qdrant_url: str | None = None
    qdrant_api_key: str | None = None
    qdrant_shards: int = 1
    qdrant_replication_factor: int = 1
    # The in-process store without QDRANT_URL: Qdrant Edge. "local" (qdrant-client's local
    # mode) is kept only as a stand-in for the server's API in tests, never for production.
    embedded_engine: str = "edge"
    # How Edge keeps vectors (vectorstore.edge_store.VECTOR_STORAGES): an int8 copy in RAM with
    # the originals on disk, or the float32 originals in RAM. New generations only.
    edge_vectors: str = "int8"
    encoder: str = "efficientnet_lite0"
    device: str = "cpu"
    batch_size: int = 16
    top_k: int = 10
    min_neighbours: int = 3
    min_score: float = 0.5
    # Embedded store: exact votes up to this many labelled points, HNSW above (where the walk
    # wins: `python -m bench.edge_ef`, docs/performance.md).
    exact_search_max_points: int = 2_000
    image_allowed_hosts: tuple[str, ...] = ()
    local_files_root: Path | None = None
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    dicom_frame: str = "middle"
    ultrasound_crop: str = "dicom"
    fetch_timeout_s: float = 10.0
    embed_wait_s: float = 20.0
    job_retry_intervals: tuple[int, ...] = (5, 30, 120)
    job_timeout_s: int = 3600
    refresh_after: int = 10
    refresh_interval_s: float = 300.0
    preannotate_on_import: bool = False
    public_url: str | None = None  # the backend as annotators' browsers reach it
    label_studio_public_url: str | None = None  # Label Studio as browsers reach it
    thumbnail_cache_bytes: int = 256 * 1024 * 1024
    # Training an encoder is refused while any class has fewer labelled images than this.
    # 10, not 20: on BUSI's replay it lets the loop's first round train sooner and never
    # lowered the curve at 200 labels; judging a challenger still needs 5 held-out images a
    # class and a bootstrap interval above 0 (docs/retraining.md, "The first round sooner").
    min_per_class: int = 10
    # The self-improving loop: a challenger is trained once labels grew by this share since
    # the last decision; `patient_key` (a task data key) keeps patients on one side of its split.
    auto_retrain: bool = True
    retrain_growth: float = 0.25
    # Share of the labelled images (by a stable hash of patient or task) a challenger is judged
    # on and no encoder of the loop trains on.
    retrain_holdout: float = 0.2
    # What a challenger must win on (workers/training/selection.py, `JUDGES`): "label-match",
    # the share of each held-out image's k nearest neighbours carrying its label, as long as
    # the vote's accuracy is not clearly lower; or "vote", the vote's accuracy alone.
    retrain_judge: str = "label-match"
    # Two-sided confidence of the bootstrap intervals a challenger is judged by. Promotion asks
    # one question (is it better?), so 0.9 is a one-sided test at 5 %.
    retrain_confidence: float = 0.9
    retrain_check_s: float = 300.0  # how often the backend looks for projects that grew
    # A project on a pretrained encoder is centred on its own images once it holds this many
    # (echolabel/encoders/centred.py); checked as often as retraining.
    auto_centre: bool = True
    centre_min_images: int = 50
    index_check_s: float = 60.0  # how often it looks for vote indexes the labels outgrew
    # TrainOptions for the loop's challengers (JSON, e.g. {"epochs": 5}); the recipe otherwise.
    retrain_options: Mapping[str, Any] = field(default_factory=dict)
    patient_key: str | None = None
    log_level: str = "WARNING"
    log_json: bool = True
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def qdrant_path(self) -> Path:
        return self.model_dir / "qdrant"

    @property
    def preprocessing(self) -> dict[str, str]:
        """What shapes a vector besides the encoder, recorded with every collection: vectors
        made under other values are refused (409, "re-embed the project")."""
        return {
            "decode": DECODE_MODE,
            "ECHOLABEL_ULTRASOUND_CROP": self.ultrasound_crop,
            "ECHOLABEL_DICOM_FRAME": self.dicom_frame,
        }

    @property
    def projects_dir(self) -> Path:
        return self.model_dir / "projects"

    @property
    def artefacts(self) -> Path:
        """The folder shared by every process for what jobs write (ECHOLABEL_ARTEFACTS_DIR)."""
        return self.artefacts_dir or self.model_dir

    @property
    def encoders_dir(self) -> Path:
        """Where trained encoders are saved, one versioned directory each."""
        return self.artefacts / "encoders"

    @property
    def selection_dir(self) -> Path:
        """The self-improving loop's records: one file per project (workers/training/selection)."""
        return self.artefacts / "selection"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every setting; raise ConfigError naming the bad variable."""
        env = os.environ if env is None else env
        reader = _EnvReader(env)
        settings = cls(
            label_studio_url=reader.url("LABEL_STUDIO_URL"),
            label_studio_api_key=reader.text("LABEL_STUDIO_API_KEY"),
            basic_auth_user=reader.text("BASIC_AUTH_USER"),
            basic_auth_pass=reader.text("BASIC_AUTH_PASS"),
            model_dir=Path(reader.text("MODEL_DIR") or "./data").expanduser(),
            artefacts_dir=reader.path("ECHOLABEL_ARTEFACTS_DIR"),
            weights_dir=reader.path("ECHOLABEL_WEIGHTS_DIR"),
            redis_url=reader.url("REDIS_URL", schemes=("redis", "rediss", "unix")),
            qdrant_url=reader.url("QDRANT_URL"),
            qdrant_api_key=reader.text("QDRANT_API_KEY"),
            qdrant_shards=reader.integer("QDRANT_SHARDS", cls.qdrant_shards, minimum=1),
            qdrant_replication_factor=reader.integer(
                "QDRANT_REPLICATION_FACTOR", cls.qdrant_replication_factor, minimum=1
            ),
            embedded_engine=reader.choice(
                "ECHOLABEL_EMBEDDED_ENGINE", ("edge", "local"), cls.embedded_engine
            ),
            edge_vectors=reader.choice(
                "ECHOLABEL_EDGE_VECTORS", ("int8", "float32"), cls.edge_vectors
            ),
            encoder=reader.text("ECHOLABEL_ENCODER") or cls.encoder,
            device=reader.choice("ECHOLABEL_DEVICE", ("auto", "cpu", "cuda"), cls.device),
            batch_size=reader.integer("ECHOLABEL_BATCH_SIZE", cls.batch_size, minimum=1),
            top_k=reader.integer("ECHOLABEL_TOP_K", cls.top_k, minimum=1),
            min_neighbours=reader.integer("ECHOLABEL_MIN_NEIGHBOURS", cls.min_neighbours, 1),
            min_score=reader.fraction("ECHOLABEL_MIN_SCORE", cls.min_score),
            exact_search_max_points=reader.integer(
                "ECHOLABEL_EXACT_SEARCH_MAX_POINTS", cls.exact_search_max_points, minimum=0
            ),
            image_allowed_hosts=reader.words("ECHOLABEL_IMAGE_ALLOWED_HOSTS"),
            local_files_root=reader.path("ECHOLABEL_LOCAL_FILES_ROOT"),
            max_image_bytes=reader.integer("ECHOLABEL_MAX_IMAGE_BYTES", cls.max_image_bytes, 1),
            max_image_pixels=reader.integer(
                "ECHOLABEL_MAX_IMAGE_PIXELS", cls.max_image_pixels, minimum=1
            ),
            dicom_frame=reader.choice(
                "ECHOLABEL_DICOM_FRAME", ("first", "middle", "last"), cls.dicom_frame
            ),
            ultrasound_crop=reader.choice(
                "ECHOLABEL_ULTRASOUND_CROP", ("off", "dicom", "all"), cls.ultrasound_crop
            ),
            fetch_timeout_s=float(
                reader.integer("ECHOLABEL_FETCH_TIMEOUT_S", int(cls.fetch_timeout_s), 1)
            ),
            embed_wait_s=float(reader.integer("ECHOLABEL_EMBED_WAIT_S", 20, minimum=0)),
            job_retry_intervals=reader.intervals("ECHOLABEL_JOB_RETRY_INTERVALS", (5, 30, 120)),
            job_timeout_s=reader.integer("ECHOLABEL_JOB_TIMEOUT_S", cls.job_timeout_s, minimum=10),
            refresh_after=reader.integer("ECHOLABEL_REFRESH_AFTER", cls.refresh_after, minimum=0),
            refresh_interval_s=float(
                reader.integer("ECHOLABEL_REFRESH_INTERVAL_S", int(cls.refresh_interval_s), 0)
            ),
            preannotate_on_import=reader.flag(
                "ECHOLABEL_PREANNOTATE_ON_IMPORT", cls.preannotate_on_import
            ),
            public_url=reader.url("ECHOLABEL_PUBLIC_URL"),
            label_studio_public_url=reader.url("ECHOLABEL_LABEL_STUDIO_PUBLIC_URL"),
            thumbnail_cache_bytes=reader.integer(
                "ECHOLABEL_THUMBNAIL_CACHE_MB", cls.thumbnail_cache_bytes >> 20, minimum=1
            )
            << 20,
            min_per_class=reader.integer("ECHOLABEL_MIN_PER_CLASS", cls.min_per_class, 1),
            auto_retrain=reader.flag("ECHOLABEL_AUTO_RETRAIN", cls.auto_retrain),
            retrain_growth=reader.fraction("ECHOLABEL_RETRAIN_GROWTH", cls.retrain_growth),
            retrain_holdout=reader.fraction("ECHOLABEL_RETRAIN_HOLDOUT", cls.retrain_holdout),
            retrain_judge=reader.choice(
                "ECHOLABEL_RETRAIN_JUDGE", ("label-match", "vote"), cls.retrain_judge
            ),
            retrain_confidence=reader.fraction(
                "ECHOLABEL_RETRAIN_CONFIDENCE", cls.retrain_confidence
            ),
            index_check_s=float(
                reader.integer("ECHOLABEL_INDEX_CHECK_S", int(cls.index_check_s), 0)
            ),
            retrain_check_s=float(
                reader.integer("ECHOLABEL_RETRAIN_CHECK_S", int(cls.retrain_check_s), 0)
            ),
            auto_centre=reader.flag("ECHOLABEL_AUTO_CENTRE", cls.auto_centre),
            centre_min_images=reader.integer(
                "ECHOLABEL_CENTRE_MIN_IMAGES", cls.centre_min_images, 1
            ),
            patient_key=reader.text("ECHOLABEL_PATIENT_KEY"),
            retrain_options=reader.json_object("ECHOLABEL_RETRAIN_OPTIONS"),
            log_level=reader.choice(
                "ECHOLABEL_LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), cls.log_level
            ),
            log_json=reader.flag("ECHOLABEL_LOG_JSON", cls.log_json),
        )
        if not 0 < settings.retrain_holdout < 1:
            raise ConfigError(
                f"ECHOLABEL_RETRAIN_HOLDOUT={settings.retrain_holdout} must be above 0 and "
                "below 1: the loop needs images to judge on and images to train on"
            )
        if not 0.5 <= settings.retrain_confidence < 1:
            raise ConfigError(
                f"ECHOLABEL_RETRAIN_CONFIDENCE={settings.retrain_confidence} must be at least "
                "0.5 and below 1: it is the two-sided confidence of the intervals a challenger "
                "is judged by"
            )
        if settings.basic_auth_user and not settings.basic_auth_pass:
            raise ConfigError("BASIC_AUTH_USER is set but BASIC_AUTH_PASS is empty")
        if settings.top_k < settings.min_neighbours:
            raise ConfigError(
                f"ECHOLABEL_MIN_NEIGHBOURS={settings.min_neighbours} exceeds "
                f"ECHOLABEL_TOP_K={settings.top_k}: every field would abstain"
            )
        return settings

    def describe(self) -> dict[str, object]:
        """Settings as plain values with secrets masked, for logs and `/health`."""
        secret = {"label_studio_api_key", "basic_auth_pass", "qdrant_api_key"}
        out: dict[str, object] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name in secret:
                value = "***" if value else None
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


class _EnvReader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str) -> str | None:
        value = self._env.get(name, "").strip()
        return value or None

    def path(self, name: str) -> Path | None:
        value = self.text(name)
        return Path(value).expanduser() if value else None

    def words(self, name: str) -> tuple[str, ...]:
        value = self.text(name) or ""
        return tuple(w.strip().lower() for w in value.replace(";", ",").split(",") if w.strip())

    def url(self, name: str, schemes: tuple[str, ...] = ("http", "https")) -> str | None:
        value = self.text(name)
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in schemes or not (parts.netloc or parts.scheme == "unix"):
            raise ConfigError(
                f"{name}={value!r} is not a URL with scheme {'/'.join(schemes)} "
                f"(example: {schemes[0]}://host:port)"
            )
        return value.rstrip("/")

    def intervals(self, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
        """Comma-separated retry delays in seconds; empty means no retry."""
        value = self.text(name)
        if value is None:
            return default
        try:
            delays = tuple(int(part) for part in value.split(",") if part.strip())
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a list of seconds like 5,30") from None
        if any(d < 0 for d in delays):
            raise ConfigError(f"{name}={value!r}: delays must not be negative")
        return delays

    def integer(self, name: str, default: int, minimum: int) -> int:
        value = self.text(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not an integer") from None
        if number < minimum:
            raise ConfigError(f"{name}={number} must be at least {minimum}")
        return number

    def json_object(self, name: str) -> dict[str, Any]:
        value = self.text(name)
        if value is None:
            return {}
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{name}={value!r} is not JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise ConfigError(f'{name} must be a JSON object, e.g. {{"epochs": 5}}')
        return parsed

    def fraction(self, name: str, default: float) -> float:
        value = self.text(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a number") from None
        if not 0.0 <= number <= 1.0:
            raise ConfigError(f"{name}={number} must be between 0 and 1")
        return number

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        value = self.text(name)
        if value is None:
            return default
        for option in options:
            if value.lower() == option.lower():
                return option
        raise ConfigError(f"{name}={value!r} must be one of {', '.join(options)}")

    def flag(self, name: str, default: bool) -> bool:
        value = self.text(name)
        if value is None:
            return default
        if value.lower() in {"1", "true", "yes", "on"}:
            return True
        if value.lower() in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{name}={value!r} must be true or false")
