"""`echolabel review` (label QA) and `echolabel duplicates` (near-duplicate pairs).

Both work on a project in the store (its live vectors; `review` as a job on the `evaluate`
queue when REDIS_URL is set) or on a folder of images with a labels CSV (embedded here, like
`echolabel evaluate`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from echolabel.settings import Settings

from .jobs import run_job
from .progress import per_encoder


def add_commands(sub: Any) -> None:
    review = sub.add_parser(
        "review", help="label QA: rank labelled tasks by how likely their label is wrong"
    )
    _source_arguments(review)
    review.add_argument("--k", type=int, default=10, help="neighbours that vote")
    review.add_argument(
        "--out", type=Path, help="folder for review.csv / review.json (folder mode)"
    )
    review.set_defaults(run=_review)

    duplicates = sub.add_parser(
        "duplicates", help="near-duplicate pairs of tasks (cosine similarity above a threshold)"
    )
    _source_arguments(duplicates)
    duplicates.add_argument(
        "--threshold", type=float, help="cosine similarity (default: the measured one, 0.92)"
    )
    duplicates.add_argument("--out", type=Path, help="write the pairs as JSON to this file")
    duplicates.set_defaults(run=_duplicates)


def _source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", help="a project in the store")
    parser.add_argument("--images", type=Path, help="folder of images (instead of --project)")
    parser.add_argument("--labels", type=Path, help="CSV with image paths relative to --images")
    parser.add_argument("--field", action="append", default=[], help="label column (repeat)")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--encoder", help="folder mode (default: ECHOLABEL_ENCODER)")
    parser.add_argument(
        "--cache", type=Path, help="folder mode: keep the embeddings here and reuse them"
    )


def _review(args: argparse.Namespace, settings: Settings) -> int:
    from workers.review.label_issues import review, summary, write_review

    if args.project:
        result = run_job(settings, "review", project=args.project, k=args.k)
        print(result["headline"])
        print(f"\n{result['review_csv']}\n{result['review_json']}", file=sys.stderr)
        return 0
    if not (args.images and args.labels and args.field and args.out):
        raise ValueError("review needs --images, --labels, --field and --out (or --project)")
    vectors, kept = _folder(args, settings)
    result = review(
        vectors,
        {f: [item.labels.get(f) for item in kept] for f in args.field},
        [item.task for item in kept],
        k=args.k,
    )
    csv_path, json_path = write_review(result, args.out)
    print(summary(result))
    print(f"\n{csv_path}\n{json_path}", file=sys.stderr)
    return 0


def _duplicates(args: argparse.Namespace, settings: Settings) -> int:
    from workers.review.duplicates import DEFAULT_THRESHOLD, find_duplicates

    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    if args.project:
        result = run_job(settings, "duplicates", project=args.project, threshold=threshold)
    else:
        if not args.images:
            raise ValueError("duplicates needs --project or --images (with --labels, --field)")
        vectors, kept = _folder(args, settings)
        result = find_duplicates(
            vectors,
            [item.task for item in kept],
            [item.labels for item in kept],
            threshold=threshold,
            image=lambda task: str(args.images.resolve() / task),
        )
    print(
        f"{len(result['pairs'])} near-duplicate pair(s) at cosine ≥ {result['threshold']} among "
        f"{result['tasks']} tasks, in {len(result['groups'])} group(s)"
    )
    for pair in result["pairs"]:
        conflict = "" if pair["same_labels"] else "  LABELS DIFFER"
        print(f"{pair['similarity']:.4f}  {pair['a']}  {pair['b']}{conflict}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
        print(f"\n{args.out}", file=sys.stderr)
    return 0


def _folder(args: argparse.Namespace, settings: Settings) -> tuple[Any, list[Any]]:
    """The folder's embeddings (cached with --cache) and the items they belong to."""
    from echolabel.folders import read_folder
    from workers.review.vectors import folder_vectors

    items = read_folder(
        args.images,
        args.labels,
        image_column=args.image_column,
        fields=tuple(args.field),
    )
    encoder = args.encoder or settings.encoder
    with per_encoder(len(items), "img", f"embed with {encoder}") as show:
        vectors, kept, failed = folder_vectors(
            items, encoder, settings, root=args.images, cache_dir=args.cache, on_progress=show
        )
    if failed:
        print(f"echolabel: {len(failed)} image(s) unreadable, left out", file=sys.stderr)
    return vectors, kept
