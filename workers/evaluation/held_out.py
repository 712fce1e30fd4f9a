"""Never measure an encoder on images it was trained on.

A trained encoder's config lists the sha256 of every image it saw in training (train and
validation). When any evaluated encoder is trained, those images leave the evaluation as
queries AND as neighbours, for every encoder of the report, so all of them are compared on
the same held-out images.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from echolabel.encoders.trained_files import encoder_dir, is_trained, read_config
from echolabel.images import ImageError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class TrainedOn:
    """What one trained encoder was trained on."""

    encoder: str
    hashes: frozenset[str]
    ids: frozenset[str]
    source: dict[str, Any]
    fingerprint: str

    def describe(self) -> dict[str, Any]:
        """The block the report carries for this encoder."""
        return {
            "training_images": len(self.hashes),
            "fingerprint": self.fingerprint,
            "source": self.source,
        }


def trained_on(encoders: Iterable[str], encoders_dir: Path) -> dict[str, TrainedOn]:
    """The training data of every trained encoder among `encoders`."""
    out = {}
    for name in encoders:
        if not is_trained(name):
            continue
        training = read_config(encoder_dir(name.partition(":")[2], encoders_dir))["training"]
        out[name] = TrainedOn(
            encoder=name,
            hashes=frozenset(i["sha256"] for i in training["images"]),
            ids=frozenset(str(i["id"]) for i in training["images"]),
            source=dict(training.get("source") or {}),
            fingerprint=training["fingerprint"],
        )
    return out


def held_out(
    items: Sequence[T],
    trained: Iterable[TrainedOn],
    read_bytes: Callable[[T], bytes],
) -> tuple[list[T], int]:
    """(items none of `trained` saw in training, how many were left out), by image content.

    An image that cannot be read stays in: the evaluation reports it as failed."""
    seen = frozenset().union(*(t.hashes for t in trained))
    if not seen:
        return list(items), 0
    kept = []
    for item in items:
        try:
            digest = hashlib.sha256(read_bytes(item)).hexdigest()
        except ImageError:
            kept.append(item)
            continue
        if digest not in seen:
            kept.append(item)
    return kept, len(items) - len(kept)


def note(report: dict[str, Any], trained: dict[str, TrainedOn], excluded: int) -> None:
    """Mark the report: which encoders are trained and how many images were left out."""
    if not trained:
        return
    report["dataset"]["held_out"] = {
        "trained_encoders": sorted(trained),
        "excluded_training_images": excluded,
        "rule": "images any trained encoder saw in training are neither queries nor neighbours",
    }
