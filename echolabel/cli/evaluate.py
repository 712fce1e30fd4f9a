"""`echolabel evaluate` (the label-match report, the papers' metrics, for encoders on a folder
or a project in the store) and `echolabel evaluate-volumes` (volume-level recall); see
docs/evaluation.md."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from echolabel.settings import Settings

from .jobs import run_job
from .progress import per_encoder


def add_commands(sub: Any) -> None:
    evaluate = sub.add_parser(
        "evaluate", help="label-match report (the papers' metrics) for encoders on a folder"
    )
    evaluate.add_argument("--images", type=Path, help="folder of images")
    evaluate.add_argument("--labels", type=Path, help="CSV with image paths relative to --images")
    evaluate.add_argument("--field", action="append", default=[], help="label column")
    evaluate.add_argument(
        "--group-map",
        action="append",
        default=[],
        metavar="FIELD=CSV",
        help="CSV (label,group) adding the field FIELD_group, e.g. organ → organ group",
    )
    evaluate.add_argument("--project", help="evaluate a project in the store instead")
    evaluate.add_argument("--image-column", default="image")
    evaluate.add_argument("--patient-column", help="patient/study id column: leave-patient-out")
    evaluate.add_argument("--encoders", help="comma-separated (default: ECHOLABEL_ENCODER)")
    evaluate.add_argument("--k", type=int, default=10)
    evaluate.add_argument("--min-class-size", type=int, default=20)
    evaluate.add_argument(
        "--choose-k", help="comma-separated candidate k: pick the best on a validation split"
    )
    evaluate.add_argument("--out", type=Path, help="folder for report.json/html (folder mode)")
    evaluate.add_argument(
        "--exclude-near-duplicates",
        nargs="?",
        type=lambda value: value if value == "default" else float(value),
        const="default",  # workers.review.duplicates.DEFAULT_THRESHOLD
        metavar="COSINE",
        help="never count a query's near-duplicates (cosine ≥ COSINE, default 0.92) among its "
        "neighbours",
    )
    evaluate.add_argument(
        "--learning-curve",
        type=int,
        nargs="?",
        const=5,
        default=0,
        metavar="SEEDS",
        help="replay an annotation session (random, uncertain-first and diverse-first "
        "order, SEEDS seeds), and the same session with automatic retraining",
    )
    evaluate.add_argument(
        "--retraining-seeds",
        type=int,
        default=1,
        metavar="N",
        help="with --learning-curve: seeds of the replay with automatic retraining at the "
        "policy's points (ECHOLABEL_RETRAIN_GROWTH, ECHOLABEL_MIN_PER_CLASS; 0: skip it); "
        "random order only, the diverse-first order has no seed and runs once",
    )
    evaluate.add_argument(
        "--retraining-first-seed",
        type=int,
        default=0,
        metavar="S",
        help="with --retraining-seeds N: seeds S..S+N-1 (to add seeds to an earlier run)",
    )
    evaluate.add_argument(
        "--retraining-orders",
        default="random,diverse_first",
        help="with --learning-curve: orders of the replay with automatic retraining "
        "(comma-separated: random, diverse_first)",
    )
    evaluate.add_argument(
        "--retraining-up-to",
        type=int,
        default=None,
        metavar="LABELS",
        help="with --learning-curve: stop the replay with automatic retraining at the last "
        "curve point up to LABELS labelled images (a round costs minutes on a CPU)",
    )
    evaluate.add_argument(
        "--retrain-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a training option of the replayed rounds (a TrainOptions field, as train-encoder "
        "names it with _ for -: epochs=5, input_size=224; repeatable)",
    )
    evaluate.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="COLUMN=VALUE",
        help="only the CSV rows whose COLUMN holds VALUE (e.g. split=train; repeatable)",
    )
    evaluate.set_defaults(run=_evaluate)

    volumes = sub.add_parser(
        "evaluate-volumes",
        help="volume-level recall: slices voted by other volumes' slices, then counted",
    )
    volumes.add_argument(
        "--volumes", type=Path, required=True, help="folder of NIfTI files / DICOM series folders"
    )
    volumes.add_argument(
        "--labels", type=Path, required=True, help="CSV: volume path (relative), label columns"
    )
    volumes.add_argument("--field", action="append", required=True, help="label column")
    volumes.add_argument("--volume-column", default="volume")
    volumes.add_argument(
        "--sampling",
        default="all",
        help="all, every-n:N, every-mm:X or random:N; several, comma-separated, are compared",
    )
    volumes.add_argument("--seed", type=int, default=0, help="seed of random:N sampling")
    volumes.add_argument("--encoders", help="comma-separated (default: ECHOLABEL_ENCODER)")
    volumes.add_argument("--k", type=int, default=10)
    volumes.add_argument("--min-class-size", type=int, default=20, help="in slices")
    volumes.add_argument("--out", type=Path, required=True, help="folder for report.json/html")
    volumes.set_defaults(run=_evaluate_volumes)


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from echolabel.folders import read_folder, with_groups
    from workers.evaluation.report import headline, write_report
    from workers.evaluation.retraining_curve import retraining_table
    from workers.evaluation.runner import RetrainingReplay, evaluate_folder
    from workers.review.duplicates import DEFAULT_THRESHOLD

    if args.exclude_near_duplicates == "default":
        args.exclude_near_duplicates = DEFAULT_THRESHOLD
    if args.project:
        return _evaluate_project(args, settings)
    if not (args.images and args.labels and args.field and args.out):
        raise ValueError("evaluate needs --images, --labels, --field and --out (or --project)")
    items = read_folder(
        args.images,
        args.labels,
        image_column=args.image_column,
        fields=tuple(args.field),
        group_column=args.patient_column,
        where=_name_values(args.where),
    )
    for field_name, mapping in _group_maps(args.group_map):
        items = with_groups(items, field_name, mapping)
    fields = [*args.field, *(f"{spec.split('=', 1)[0]}_group" for spec in args.group_map)]
    encoders = _encoders(args.encoders, settings)
    with per_encoder(len(items) * len(encoders), "img", "evaluate") as show:
        report = evaluate_folder(
            items,
            fields,
            encoders,
            settings,
            root=args.images.resolve(),
            k=args.k,
            min_class_size=args.min_class_size,
            k_candidates=[int(k) for k in (args.choose_k or "").split(",") if k.strip()],
            near_duplicate_threshold=args.exclude_near_duplicates,
            learning_curve_seeds=range(args.learning_curve),
            retraining=dataclasses.replace(
                RetrainingReplay.from_settings(
                    settings,
                    range(
                        args.retraining_first_seed,
                        args.retraining_first_seed + args.retraining_seeds,
                    ),
                    _train_options(args.retrain_option),
                ),
                orders=_retraining_orders(args.retraining_orders),
                up_to=args.retraining_up_to,
            )
            if args.learning_curve and args.retraining_seeds
            else None,
            command="echolabel " + shlex.join(args.argv),
            on_progress=show,
        )
    json_path, html_path = write_report(report, args.out)
    print(headline(report))
    for name, block in report["encoders"].items():
        if "learning_curve_retraining" in block:
            print(f"\n{name}, replayed with automatic retraining:")
            print(retraining_table(block["learning_curve_retraining"]))
    print(f"\n{json_path}\n{html_path}", file=sys.stderr)
    return 0


def _evaluate_project(args: argparse.Namespace, settings: Settings) -> int:
    """The report of a project in the store: queued to the `evaluate` workers with Redis."""
    result = run_job(
        settings,
        "evaluate",
        project=args.project,
        k=args.k,
        min_class_size=args.min_class_size,
        near_duplicate_threshold=args.exclude_near_duplicates,
        learning_curve_seeds=args.learning_curve,
    )
    print(result["headline"])
    print(f"\n{result['report_json']}\n{result['report_html']}", file=sys.stderr)
    return 0


def _evaluate_volumes(args: argparse.Namespace, settings: Settings) -> int:
    from echolabel.folders import read_folder
    from echolabel.volumes import Sampling
    from workers.evaluation.report import headline, write_report
    from workers.evaluation.volumes import evaluate_volumes, volume_headline

    samplings = [Sampling.parse(spec) for spec in args.sampling.split(",") if spec.strip()]
    items = read_folder(
        args.volumes, args.labels, image_column=args.volume_column, fields=tuple(args.field)
    )
    encoders = _encoders(args.encoders, settings)
    with per_encoder(len(items) * len(encoders), "volume", "evaluate-volumes") as show:
        report = evaluate_volumes(
            items,
            args.field,
            encoders,
            settings,
            samplings=samplings,
            seed=args.seed,
            k=args.k,
            min_class_size=args.min_class_size,
            command="echolabel " + shlex.join(args.argv),
            description=f"volumes in {args.volumes.resolve()}",
            on_progress=show,
        )
    json_path, html_path = write_report(report, args.out)
    print(volume_headline(report))
    print("\nslices (leave-one-volume-out):\n" + headline(report))
    print(f"\n{json_path}\n{html_path}", file=sys.stderr)
    return 0


def _encoders(given: str | None, settings: Settings) -> list[str]:
    """`--encoders a,b`, else the configured encoder."""
    return [e.strip() for e in (given or settings.encoder).split(",") if e.strip()]


def _retraining_orders(spec: str) -> list[str]:
    """`random,diverse_first` → ["random", "diverse_first"], each checked."""
    from workers.evaluation.retraining_curve import RETRAINING_ORDERS

    orders = [o.strip() for o in spec.split(",") if o.strip()]
    unknown = [o for o in orders if o not in RETRAINING_ORDERS]
    if unknown or not orders:
        raise ValueError(
            f"--retraining-orders {spec!r}: choose among {', '.join(RETRAINING_ORDERS)}"
        )
    return orders


def _train_options(specs: Sequence[str]) -> dict[str, Any]:
    """`epochs=5` → {"epochs": 5}: names are TrainOptions fields, values JSON or text."""
    from workers.training import TrainOptions

    names = {f.name for f in dataclasses.fields(TrainOptions)}
    out: dict[str, Any] = {}
    for name, value in _name_values(specs, flag="--retrain-option").items():
        if name not in names:
            raise ValueError(
                f"--retrain-option {name}: not a training option; one of {sorted(names)}"
            )
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value  # a word, e.g. start=efficientnet_lite2
    return out


def _name_values(specs: Sequence[str], flag: str = "--where") -> dict[str, str]:
    """`--where split=train` → {"split": "train"}."""
    pairs = [spec.partition("=") for spec in specs]
    bad = [spec for spec, (_, sep, _) in zip(specs, pairs, strict=True) if not sep]
    if bad:
        raise ValueError(f"{flag} {bad[0]!r}: expected NAME=VALUE")
    return {name: value for name, _, value in pairs}


def _group_maps(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """`--group-map organ=groups.csv` → [("organ", Path("groups.csv"))]."""
    out = []
    for spec in specs:
        field_name, _, path = spec.partition("=")
        if not path:
            raise ValueError(f"--group-map {spec!r}: expected FIELD=path/to/mapping.csv")
        out.append((field_name, Path(path)))
    return out
