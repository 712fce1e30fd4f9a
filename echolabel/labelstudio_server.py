"""Run a real Label Studio 1.23 on loopback: for the end-to-end tests and `echolabel demo`.

Label Studio pins its own Django, SDK and rq, so it lives in a virtual environment of its own.
Migrating a fresh SQLite database costs ~35 s on two cores: we migrate once into a template
and copy it into every new data directory, so a start takes seconds.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LABEL_STUDIO_VERSION = "1.23.2"
DATABASE_NAME = "label_studio.sqlite3"


class LabelStudioServerError(RuntimeError):
    """Label Studio could not be installed or started; the message says what to look at."""


def ensure_installed(
    venv: Path, version: str = LABEL_STUDIO_VERSION, say: Callable[[str], None] = print
) -> Path:
    """The `label-studio` executable in `venv`, installing it there first when missing."""
    executable = venv / "bin" / "label-studio"
    marker = venv / f".echolabel-label-studio-{version}"
    if executable.exists() and marker.exists():
        return executable
    # Two processes installing into one venv at once leave it broken (pip then fails on a
    # half-written package): the second waits for the first, then finds the marker.
    with _exclusive(venv.with_name(venv.name + ".lock")):
        if executable.exists() and marker.exists():
            return executable
        say(f"installing Label Studio {version} into {venv} (first use only: ~2 min, ~1 GB)")
        python = venv / "bin" / "python"
        if not python.exists():
            _run([sys.executable, "-m", "venv", str(venv)], "create the Label Studio venv")
        _run(
            [str(python), "-m", "pip", "install", "-q", f"label-studio=={version}"],
            f"pip install label-studio=={version} (needs the package registry)",
        )
        marker.touch()
    return executable


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created if missing), waiting for any holder."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(command: list[str], what: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        raise LabelStudioServerError(f"could not {what}:\n" + "\n".join(tail))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class LabelStudioServer:
    """One Label Studio process on 127.0.0.1 with a known user and legacy token.

    `local_files_root` is served under /data/local-files/ (Label Studio's local storage);
    backends on loopback are allowed (`ML_BLOCK_LOCAL_IP=false`, SSRF protection off) so that
    connecting our backend also creates its webhook.
    """

    executable: Path
    data_dir: Path
    username: str
    password: str
    token: str
    local_files_root: Path | None = None
    port: int = field(default_factory=free_port)
    template_dir: Path | None = None
    log_path: Path | None = None
    # Settings over the defaults below, e.g. {"SSRF_PROTECTION_ENABLED": "true"} (a stock set-up).
    extra_env: dict[str, str] = field(default_factory=dict)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        """An explicit environment: Label Studio reads HOST, PORT, USERNAME... unprefixed too."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.data_dir),
            "LANG": "C.UTF-8",
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
            "LABEL_STUDIO_USERNAME": self.username,
            "LABEL_STUDIO_PASSWORD": self.password,
            "LABEL_STUDIO_USER_TOKEN": self.token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "DEBUG": "false",
        }
        if self.local_files_root is not None:
            env["LOCAL_FILES_SERVING_ENABLED"] = "true"
            env["LOCAL_FILES_DOCUMENT_ROOT"] = str(self.local_files_root)
        return env | self.extra_env

    def migrate_template(self) -> None:
        """Create the migrated empty database in `template_dir` once (Label Studio's ~35 s)."""
        if self.template_dir is None or (self.template_dir / DATABASE_NAME).exists():
            return
        # Migrated aside and moved into place whole: a process that waited on the lock, or a
        # later run after a killed migration, never copies a half-migrated database.
        with _exclusive(self.template_dir.with_name(self.template_dir.name + ".lock")):
            if (self.template_dir / DATABASE_NAME).exists():
                return
            staging = self.template_dir / "migrating"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            env = self.environment() | {
                "LABEL_STUDIO_BASE_DATA_DIR": str(staging),
                "HOME": str(staging),
            }
            _run([str(self.executable), "version"], "migrate Label Studio's database", env=env)
            os.replace(staging / DATABASE_NAME, self.template_dir / DATABASE_NAME)
            shutil.rmtree(staging, ignore_errors=True)

    def start(self, timeout_s: float = 120.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.template_dir is not None:
            self.migrate_template()
            database = self.data_dir / DATABASE_NAME
            if not database.exists():
                shutil.copy2(self.template_dir / DATABASE_NAME, database)
        log_path = self.log_path or self.data_dir / "label-studio.log"
        with log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    str(self.executable),
                    "start",
                    "--no-browser",
                    "--internal-host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--host",
                    self.url,
                ],
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # one signal stops Label Studio and its children
            )
        self._wait_ready(timeout_s, log_path)

    def _wait_ready(self, timeout_s: float, log_path: Path) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise LabelStudioServerError(
                    f"Label Studio exited with {self._process.returncode}; see {log_path}"
                )
            try:
                # /health answers before the user exists; the token proves set-up finished.
                answer = httpx.get(
                    f"{self.url}/api/current-user/whoami",
                    headers={"Authorization": f"Token {self.token}"},
                    timeout=2.0,
                )
                if answer.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise LabelStudioServerError(
            f"Label Studio did not answer on {self.url} within {timeout_s:.0f} s; see {log_path}"
        )

    def stop(self, timeout_s: float = 15.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def __enter__(self) -> LabelStudioServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
