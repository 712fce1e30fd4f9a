"""`echolabel index` (a folder of images, or a Label Studio project's tasks, embedded ahead of
time) and `echolabel predict` (the suggestion for one image)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from echolabel.settings import Settings

from .progress import counting

if TYPE_CHECKING:
    from echolabel.core.model import Suggestion


def add_commands(sub: Any) -> None:
    index = sub.add_parser("index", help="embed a folder of images into a project's collection")
    index.add_argument(
        "images",
        type=Path,
        nargs="?",
        help="folder of images; without it, --project names a Label Studio project whose tasks "
        "are pre-embedded (queued to the workers when REDIS_URL is set)",
    )
    index.add_argument("--labels", type=Path, help="CSV with an image column and label columns")
    index.add_argument("--image-column", default="image", help="CSV column with the image path")
    index.add_argument("--field", action="append", default=[], help="label column (repeatable)")
    index.add_argument("--project", help="project id or name (default for a folder: local)")
    index.add_argument("--limit", type=int, help="index only the first N images")
    index.set_defaults(run=_index)

    predict = sub.add_parser("predict", help="suggest labels for one image")
    predict.add_argument("image", type=Path)
    predict.add_argument("--project", default="local")
    predict.set_defaults(run=_predict)


def _index(args: argparse.Namespace, settings: Settings) -> int:
    if args.images is None:
        if not args.project:
            raise ValueError("give a folder of images, or --project N for a Label Studio project")
        return _index_label_studio_project(args, settings)
    return _index_folder(args, settings)


def _index_label_studio_project(args: argparse.Namespace, settings: Settings) -> int:
    """Pre-embed a Label Studio project's tasks so that its predictions are instant."""
    from echolabel.core.indexing import project_task_images
    from echolabel.core.projects import project_id
    from workers.runtime import embed_or_enqueue, open_runtime

    project = project_id(args.project)
    items, skipped = project_task_images(settings, project)
    items = items[: args.limit]
    counts = {"project": project, "tasks": len(items), "skipped": skipped}
    with open_runtime(settings) as runtime, counting("img", f"index {project}") as show:
        summary = embed_or_enqueue(runtime, project, items, on_progress=show)
    print(json.dumps({**counts, **summary}, indent=2))
    return 0


def _index_folder(args: argparse.Namespace, settings: Settings) -> int:
    from echolabel.core.indexing import index_folder
    from echolabel.folders import read_folder
    from workers.runtime import open_runtime

    project = args.project or "local"
    items = read_folder(
        args.images, args.labels, image_column=args.image_column, fields=tuple(args.field)
    )[: args.limit]
    # The folder is the only place this command reads images from; it embeds here (a folder
    # is indexed before any server runs, so this process holds the store).
    settings = dataclasses.replace(settings, local_files_root=args.images.resolve(), redis_url=None)
    with open_runtime(settings) as runtime, counting("img", f"index {project}") as show:
        summary = index_folder(runtime, project, items, args.field, on_progress=show)
    print(json.dumps(summary, indent=2))
    return 1 if summary["failed"] and len(summary["failed"]) == len(items) else 0


def _predict(args: argparse.Namespace, settings: Settings) -> int:
    from echolabel.core.model import SimilarityModel
    from workers.runtime import open_runtime

    path = args.image.resolve()
    settings = dataclasses.replace(settings, local_files_root=path.parent)
    with open_runtime(settings) as runtime:
        model = SimilarityModel(runtime, args.project)
        if runtime.store.collection(model.project) is None:
            raise ValueError(
                f"project {args.project} has no collection yet: run `echolabel index` first"
            )
        suggestion = model.suggest_image(str(path))
        version = model.model_version
    print(json.dumps(_suggestion_json(str(path), version, suggestion), indent=2))
    return 0


def _suggestion_json(image: str, version: str, suggestion: Suggestion) -> dict[str, Any]:
    """What `predict` prints: each field's vote and the neighbours behind it."""
    return {
        "image": image,
        "model_version": version,
        "suggestions": {
            name: {
                "label": v.label,
                **({"choices": list(v.suggested)} if v.multiple else {}),
                "score": round(v.score, 4),
                "support": v.support,
                **({"abstained": v.abstain_reason} if v.abstained else {}),
            }
            for name, v in suggestion.votes.items()
        },
        "neighbours": [
            {"task": n.task, "similarity": round(n.similarity, 4), "labels": dict(n.labels)}
            for n in suggestion.neighbours
        ],
    }
