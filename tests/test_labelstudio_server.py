"""First uses of the Label Studio install and its migrated template, several at once (two
`echolabel demo` commands, or two pytest workers): one does the work, the others wait and
reuse it, and nobody copies a half-written database. The executables are stand-in scripts."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

from echolabel.labelstudio_server import DATABASE_NAME, LabelStudioServer, ensure_installed


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _at_once(work, count: int = 3) -> None:
    threads = [threading.Thread(target=work) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)


def test_concurrent_installs_run_pip_once_and_all_get_the_executable(tmp_path):
    venv = tmp_path / "venv"
    runs = tmp_path / "pip-runs"
    # Stands in for the venv's python: `-m pip install` takes a while, then leaves the script.
    _script(
        venv / "bin" / "python",
        f'echo "$*" >> {runs}\nsleep 0.5\nprintf "#!/bin/sh\\n" > {venv}/bin/label-studio\n',
    )
    found: list[Path] = []
    _at_once(lambda: found.append(ensure_installed(venv, version="9.9.9", say=lambda _: None)))
    assert runs.read_text().splitlines() == ["-m pip install -q label-studio==9.9.9"]
    assert found == [venv / "bin" / "label-studio"] * 3
    assert ensure_installed(venv, version="9.9.9", say=lambda _: None) == found[0]


def test_concurrent_first_starts_migrate_the_template_once_and_whole(tmp_path):
    runs = tmp_path / "migrations"
    # Stands in for `label-studio version`: writes the database in two steps, slowly.
    executable = _script(
        tmp_path / "label-studio",
        f'echo "$1" >> {runs}\ndb="$LABEL_STUDIO_BASE_DATA_DIR/{DATABASE_NAME}"\n'
        'echo half > "$db"\nsleep 0.5\necho migrated >> "$db"\n',
    )
    template = tmp_path / "template"
    (template / "migrating").mkdir(parents=True)  # left by a migration that was killed
    (template / "migrating" / DATABASE_NAME).write_text("half\n")

    def first_start() -> None:
        LabelStudioServer(
            executable=executable,
            data_dir=tmp_path / "data",
            username="admin@example.com",
            password="pass",
            token="t",
            template_dir=template,
        ).migrate_template()

    _at_once(first_start)
    assert runs.read_text().splitlines() == ["version"]
    assert (template / DATABASE_NAME).read_text() == "half\nmigrated\n"
    assert not (template / "migrating").exists()
