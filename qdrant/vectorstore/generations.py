"""Names and metadata of a project's generations, the same on every engine.

Each project has an alias `<prefix>_p<project>` pointing at one *generation* collection
`<prefix>_p<project>_g<n>`; re-embedding builds generation n+1 beside it and moves the alias
atomically. A generation's metadata records what its vectors were made with: the encoder,
its weights and dimension. Vectors made any other way are refused (HTTP 409, "re-embed the
project") instead of silently mixed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .base import CollectionInfo, DimensionMismatchError, StoreError


def alias_name(prefix: str, project: int | str) -> str:
    """The project's alias: the name that always points at its live generation."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", str(project))
    return f"{prefix}_p{safe}"


def generation_pattern(alias: str) -> re.Pattern[str]:
    """Matches the names of the alias's generations; group 1 is the generation number."""
    return re.compile(re.escape(alias) + r"_g(\d+)$")


def new_meta(
    project: int | str,
    encoder: str,
    dim: int,
    weights_id: str,
    generation: int,
) -> dict[str, Any]:
    """The metadata a new generation is created with."""
    meta: dict[str, Any] = {
        "encoder": encoder,
        "dim": dim,
        "weights_id": weights_id,
        "generation": generation,
        "project": str(project),
    }
    return meta


def info_from_meta(project: int | str, name: str, meta: Mapping[str, Any]) -> CollectionInfo:
    """A generation's CollectionInfo from its metadata; a clear error if it is not ours."""
    try:
        return CollectionInfo(
            project=project,
            encoder=str(meta["encoder"]),
            dim=int(meta["dim"]),
            weights_id=str(meta.get("weights_id", "")),
            generation=int(meta["generation"]),
            name=name,
            published_version=meta.get("published_version") or None,
            label_state=int(meta.get("label_state") or 0),
            label_changes=tuple(meta.get("label_changes") or ()),
            vote_radius_min=float(meta.get("vote_radius_min", -1.0)),
        )
    except KeyError as exc:
        raise StoreError(
            f"collection {name} has no echolabel metadata ({exc.args[0]} missing): it was not "
            "created by echolabel; remove it or use another ECHOLABEL collection prefix"
        ) from None


def check_encoder(info: CollectionInfo, encoder: str, dim: int) -> None:
    """Refuse an encoder or dimension other than the live generation's (HTTP 409)."""
    if info.encoder != encoder or info.dim != dim:
        raise DimensionMismatchError(
            f"project {info.project}'s collection {info.name} holds {info.encoder} vectors "
            f"({info.dim}-d), not {encoder} ({dim}-d): re-embed the project with "
            f"`echolabel reembed --project {info.project} --encoder {encoder}` or configure "
            f"ECHOLABEL_ENCODER={info.encoder}"
        )
