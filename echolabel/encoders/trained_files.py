"""The files of encoders trained on a project's own labels: names, directories, config.

Kept apart from the model (trained.py, which needs torch) so that the admin page, evaluation
and the backend's start list and name trained encoders without importing torch.

Each one is a directory `<artefacts>/encoders/<name>-v<N>/` holding `weights.safetensors`
(the fine-tuned backbone and its classification heads), `config.json` (backbone, input size,
normalisation, fields and classes, the training images) and `report.json` (class counts,
curves, validation metrics). The registry loads it as `trained:<name>-v<N>`; the embedding is
the backbone's pooled features, L2-normalised, with the preprocessing training used.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from echolabel.encoders.base import EncoderError

PREFIX = "trained"
FORMAT = "echolabel-trained-encoder/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
REPORT_FILE = "report.json"
BACKBONE_PREFIX = "backbone."
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def encoder_name(directory_name: str) -> str:
    """The registry name of a trained encoder directory (`busi-v1` → `trained:busi-v1`)."""
    return f"{PREFIX}:{directory_name}"


def is_trained(name: str) -> bool:
    """Whether `name` is a trained encoder (as opposed to a pretrained one)."""
    prefix, sep, _ = name.partition(":")
    return bool(sep) and prefix == PREFIX


def check_base_name(name: str) -> str:
    """A base name for versioned directories: letters, digits, `_.-`, no `-v<N>` suffix."""
    if not _NAME.match(name) or re.search(r"-v\d+$", name):
        raise ValueError(
            f"encoder name {name!r}: expected letters, digits, '_', '.' or '-' "
            "(starting with a letter or digit), without a '-v<N>' version suffix"
        )
    return name


def next_version_dir(encoders_dir: Path, base: str) -> Path:
    """`<encoders_dir>/<base>-v<N+1>` where N is the highest version already there."""
    versions = [
        int(match.group(1))
        for path in encoders_dir.glob(f"{base}-v*")
        if (match := re.fullmatch(re.escape(base) + r"-v(\d+)", path.name))
    ]
    return encoders_dir / f"{base}-v{max(versions, default=0) + 1}"


def encoder_dir(member: str, encoders_dir: Path) -> Path:
    """The directory of trained encoder `member` (`busi-v1`), checked to exist."""
    if not _NAME.match(member):
        raise EncoderError(f"trained encoder name {member!r} is not a directory name")
    path = encoders_dir / member
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        known = ", ".join(encoder_name(p.name) for p in list_trained(encoders_dir)) or "none"
        raise EncoderError(
            f"trained encoder {member!r} not found: expected {path / CONFIG_FILE} and "
            f"{path / WEIGHTS_FILE} (trained encoders here: {known}); "
            "train one with `echolabel train-encoder`"
        )
    return path


def list_trained(encoders_dir: Path) -> list[Path]:
    """Every complete trained-encoder directory under `encoders_dir`, sorted by name."""
    if not encoders_dir.is_dir():
        return []
    return sorted(
        p
        for p in encoders_dir.iterdir()
        if (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()
    )


def read_config(path: Path) -> dict[str, Any]:
    """The config.json of a trained encoder directory."""
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT:
        raise EncoderError(f"{path / CONFIG_FILE}: expected format {FORMAT!r}")
    return config
