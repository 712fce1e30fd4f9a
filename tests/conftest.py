"""Shared fixtures: settings under tmp, the real Redis, and a real Label Studio. Helpers (the
tiny encoders, image and webhook builders) live in tests/helpers.py.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from redis import Redis

from echolabel.settings import Settings
from tests.helpers import REDIS_URL, TINY_ENCODER, label_studio_server


def pytest_configure(config: pytest.Config) -> None:
    """With pytest-xdist workers (`-n`), one torch thread a process: the workers run backends,
    RQ workers and Label Studio side by side, and torch's thread per core in each of them
    would oversubscribe the cores (docs/development.md). Set before the workers start, so
    they and every process they spawn inherit it."""
    if (config.getoption("numprocesses", None) or 0) > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    images = tmp_path / "images"
    images.mkdir()
    return Settings(
        model_dir=tmp_path / "model",
        encoder=TINY_ENCODER,
        local_files_root=images,
        min_neighbours=2,
        min_score=0.5,
        max_image_bytes=200_000,
        max_image_pixels=1_000_000,
        auto_retrain=False,
        auto_centre=False,
    )


@pytest.fixture
def redis_db():
    """The real Redis (test database, flushed before and after); skipped when absent."""
    connection = Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        connection.ping()
    except Exception as exc:
        pytest.skip(f"no Redis at {REDIS_URL} ({exc}); start one to run the worker tests")
    connection.flushdb()
    yield connection
    connection.flushdb()
    connection.close()


@pytest.fixture
def redis_settings(settings, redis_db) -> Settings:
    """The test settings with Redis: a real encoder in worker processes, no waiting."""
    return dataclasses.replace(
        settings,
        redis_url=REDIS_URL,
        encoder="efficientnet_lite0",
        embed_wait_s=0.0,
        job_retry_intervals=(0, 0),
        batch_size=4,
    )


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A real Label Studio 1.23.2 on loopback for the whole session (installed on first use).

    It lives in its own venv under `.label-studio/` (or $ECHOLABEL_TEST_LABEL_STUDIO), with a
    migrated empty database kept there as a template. Local files are served from `files_root`.
    """
    server = label_studio_server(tmp_path_factory.mktemp("label-studio"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def label_studio_admin(label_studio):
    """A client of the real Label Studio with its admin's legacy token."""
    from echolabel.labelstudio import LabelStudioClient

    admin = LabelStudioClient(
        Settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.token)
    )
    yield admin
    admin.close()


@pytest.fixture(scope="session")
def label_studio_pat(label_studio_admin) -> str:
    """The admin's personal access token (Label Studio 1.23 allows one valid token a user)."""
    return label_studio_admin.create_personal_access_token()
