"""Names and metadata of a project's generations, the same on every engine.

Each project has an alias `<prefix>_p<project>` pointing at one *generation* collection
`<prefix>_p<project>_g<n>`; re-embedding builds generation n+1 beside it and moves the alias
atomically. A generation's metadata records what its vectors were made with: the encoder,
its weights and dimension, and the image preprocessing. Vectors made any other way are
refused (HTTP 409, "re-embed the project") instead of silently mixed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .base import CollectionInfo, DimensionMismatchError, StoreError

# The preprocessing a process embeds with (echolabel.settings.Settings.preprocessing): setting
# name -> value. Recorded in each new generation; other values are refused like an encoder.
Preprocessing = Mapping[str, str]


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
    preprocessing: Preprocessing | None = None,
) -> dict[str, Any]:
    """The metadata a new generation is created with."""
    meta: dict[str, Any] = {
        "encoder": encoder,
        "dim": dim,
        "weights_id": weights_id,
        "generation": generation,
        "project": str(project),
    }
    if preprocessing is not None:
        meta["preprocessing"] = dict(preprocessing)
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
            vote_radius_edges=tuple(float(e) for e in meta.get("vote_radius_edges", ())),
            preprocessing=_pairs(meta.get("preprocessing")),
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


def check_preprocessing(info: CollectionInfo, preprocessing: Preprocessing | None) -> None:
    """Refuse vectors preprocessed otherwise than the generation's (HTTP 409, as an encoder).

    A generation that recorded nothing (created before preprocessing was recorded) and a store
    told nothing accept anything: there is nothing to compare.
    """
    if preprocessing is None or info.preprocessing is None:
        return
    recorded = dict(info.preprocessing)
    differing = sorted(
        name
        for name in recorded.keys() | preprocessing.keys()
        if recorded.get(name) != preprocessing.get(name)
    )
    if differing:
        found = "; ".join(
            f"{name} is {preprocessing.get(name)!r} here, {recorded.get(name)!r} in the collection"
            for name in differing
        )
        raise DimensionMismatchError(
            f"project {info.project}'s collection {info.name} holds vectors made with other "
            f"image preprocessing ({found}): re-embed the project with `echolabel reembed "
            f"--project {info.project} --encoder {info.encoder}`, or restore those settings"
        )


def _pairs(value: object) -> tuple[tuple[str, str], ...] | None:
    if not isinstance(value, Mapping):
        return None
    return tuple(sorted((str(k), str(v)) for k, v in value.items()))
