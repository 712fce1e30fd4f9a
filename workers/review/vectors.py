"""A labelled folder's embeddings, computed once per encoder and cached on disk.

The review measurements (label QA on flipped labels, near-duplicates, learning curves) each
need the same vectors; embedding 780 images takes minutes on a CPU, so they share a cache
keyed by the folder's fingerprint and the encoder's weights id.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from echolabel.core.runtime import Runtime
from echolabel.folders import Item, fingerprint, read_folder
from echolabel.settings import Settings


def folder_vectors(
    items: Sequence[Item],
    encoder: str,
    settings: Settings,
    *,
    root: Path,
    cache_dir: Path | None = None,
    on_progress: Callable[[str, int], None] = lambda encoder, n: None,
) -> tuple[np.ndarray, list[Item], dict[str, str]]:
    """(L2-normalised vectors, the items they belong to, failed images) for `items`.

    With `cache_dir`, a previous result for the same items (fingerprint) and weights is read
    from `<cache_dir>/<encoder>-<fingerprint>.npz` instead of embedding again.
    """
    from workers.evaluation.runner import embed_all

    settings = dataclasses.replace(settings, local_files_root=root.resolve())
    runtime = Runtime.build(settings)  # no store: the folder is the data
    embedder = runtime.embedder
    model = embedder.encoder(encoder)
    key = f"{encoder}-{fingerprint(list(items))}"
    cached = cache_dir / f"{key}.npz" if cache_dir is not None else None
    by_task = {item.task: item for item in items}
    with runtime:
        if cached is not None and cached.exists():
            data = np.load(cached, allow_pickle=False)
            meta = json.loads(str(data["meta"]))
            if meta["weights_id"] == model.weights_id:
                return data["vectors"], [by_task[t] for t in meta["tasks"]], meta["failed"]
        vectors, kept, failed = embed_all(
            embedder, runtime.fetcher.load, encoder, items, on_progress
        )
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        meta = {"weights_id": model.weights_id, "tasks": [i.task for i in kept], "failed": failed}
        np.savez(cached, vectors=vectors, meta=np.array(json.dumps(meta)))
    return vectors, kept, failed


def add_folder_arguments(parser: argparse.ArgumentParser) -> None:
    """The labelled folder and encoder a review measurement runs on."""
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--field", required=True)
    parser.add_argument("--encoder", default="efficientnet_lite0")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/echolabel-review/cache"))


def labelled_folder_vectors(
    args: argparse.Namespace,
) -> tuple[np.ndarray, list[Item], dict[str, str]]:
    """`folder_vectors` of the folder's items labelled in `--field` (see add_folder_arguments)."""
    items = [
        i
        for i in read_folder(args.images, args.labels, fields=(args.field,))
        if args.field in i.labels
    ]
    return folder_vectors(
        items, args.encoder, Settings.from_env(), root=args.images, cache_dir=args.cache
    )
