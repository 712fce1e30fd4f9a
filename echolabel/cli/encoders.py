"""Encoders: `echolabel weights download|list`, `echolabel train-encoder` (on a project's labels
or a labelled folder) and `echolabel reembed` (a project with another encoder)
(docs/encoders.md, docs/training.md, docs/reembedding.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from echolabel.settings import Settings

from .jobs import print_job


def add_commands(sub: Any) -> None:
    reembed = sub.add_parser("reembed", help="re-embed a project with another encoder")
    reembed.add_argument("--project", required=True)
    reembed.add_argument("--encoder", required=True)
    reembed.add_argument("--no-wait", action="store_true", help="queue it and return")
    reembed.set_defaults(run=_reembed)

    _add_train_encoder(sub)

    centre = sub.add_parser(
        "centre-encoder",
        help="centre the project's pretrained encoder on its own images (label-free) and save "
        "it as encoder centred:project-<id>-centred-v<N> (docs/encoders.md)",
    )
    centre.add_argument("--project", required=True)
    centre.add_argument(
        "--reembed", action="store_true", help="then re-embed the project with it (zero downtime)"
    )
    centre.add_argument("--no-wait", action="store_true", help="queue it and return")
    centre.set_defaults(run=_centre_encoder)

    weights = sub.add_parser("weights", help="encoder weights")
    weights_sub = weights.add_subparsers(dest="weights_command", required=True)
    download = weights_sub.add_parser("download", help="download weights (needs internet)")
    download.add_argument("encoder")
    download.add_argument("--dir", type=Path, help="default: ECHOLABEL_WEIGHTS_DIR")
    download.set_defaults(run=_download_weights)
    listing = weights_sub.add_parser("list", help="list the registered encoders")
    listing.set_defaults(run=_list_encoders)


def _add_train_encoder(sub: Any) -> None:
    train = sub.add_parser(
        "train-encoder",
        help="fine-tune an encoder on the labels of a project (or a folder + CSV) and save it "
        "under ECHOLABEL_ARTEFACTS_DIR (default MODEL_DIR)/encoders/<name>-v<N>/ as encoder "
        "trained:<name>-v<N>",
    )
    train.add_argument("--project", help="train on this project's labelled tasks (a job)")
    train.add_argument("--images", type=Path, help="or: folder of images")
    train.add_argument("--labels", type=Path, help="CSV with image paths relative to --images")
    train.add_argument("--image-column", default="image")
    train.add_argument("--field", action="append", default=[], help="choices field (repeatable)")
    train.add_argument(
        "--split-column",
        help="CSV column: train rows train, val rows validate, other rows (test) are never read",
    )
    train.add_argument("--train-split", default="train", help="split value of training rows")
    train.add_argument(
        "--patient-column",
        help="CSV column / payload key with patient ids: "
        "the validation split is then patient-disjoint",
    )
    train.add_argument("--name", help="encoder name (default: the project or folder name)")
    # Training options default to the recipe's (workers.training.TrainOptions): only those
    # given here override it, so the recipe is written once.
    recipe = "default: the recipe's (docs/training.md)"
    train.add_argument(
        "--start",
        help=f"pretrained encoder: efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2; "
        f"{recipe}",
    )
    train.add_argument("--epochs", type=int, help=recipe)
    train.add_argument("--patience", type=int, help=f"early-stopping patience; {recipe}")
    train.add_argument("--batch-size", type=int, help=recipe)
    train.add_argument("--input-size", type=int, help=f"training and embedding side; {recipe}")
    train.add_argument(
        "--freeze-blocks", type=int, help=f"frozen stem + first stages (of 7); {recipe}"
    )
    train.add_argument(
        "--views", type=int, help=f"augmented views of each image (frozen part); {recipe}"
    )
    train.add_argument("--lr", type=float, help=recipe)
    train.add_argument(
        "--metric-weight",
        type=float,
        help=f"weight of a supervised-contrastive term (0: off); {recipe}",
    )
    train.add_argument(
        "--val-fraction",
        type=float,
        help="share held out to pick the best epoch and stop early (0: none, every epoch runs "
        f"and the last is kept; rows marked validation are used all the same); {recipe}",
    )
    train.add_argument("--no-hflip", action="store_true", help="no mirrored images")
    train.add_argument(
        "--augment-strength",
        type=float,
        help=f"how far augmented views move from the image (1: ±5°, ±5 %% shift); {recipe}",
    )
    train.add_argument(
        "--ema-halflife-epochs",
        type=float,
        help=f"keep a moving average of the weights with this half-life (0: off); {recipe}",
    )
    train.add_argument(
        "--tta-hflip",
        action=argparse.BooleanOptionalAction,
        help=f"embed each image as the mean of it and its mirror; {recipe}",
    )
    train.add_argument("--seed", type=int, help=recipe)
    train.add_argument(
        "--select-by",
        choices=("head", "neighbours"),
        help="keep the epoch whose heads' accuracy, or whose vote of the training images (the "
        f"product's, ECHOLABEL_TOP_K ...), is best on the validation images; {recipe}",
    )
    train.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), help="default: ECHOLABEL_DEVICE"
    )
    train.add_argument(
        "--min-per-class",
        type=int,
        help="refuse below this many images per class (ECHOLABEL_MIN_PER_CLASS)",
    )
    train.add_argument(
        "--reembed", action="store_true", help="then re-embed the project with it (zero downtime)"
    )
    train.add_argument("--no-wait", action="store_true", help="queue it and return")
    train.set_defaults(run=_train_encoder)


def _reembed(args: argparse.Namespace, settings: Settings) -> int:
    """Queue the re-embedding and follow its progress (Ctrl-C detaches, the job goes on)."""
    return print_job(
        settings, "reembed", no_wait=args.no_wait, project=args.project, encoder=args.encoder
    )


def _centre_encoder(args: argparse.Namespace, settings: Settings) -> int:
    """Queue the centring (and the re-embedding) and follow its progress."""
    return print_job(
        settings,
        "centre-encoder",
        no_wait=args.no_wait,
        project=args.project,
        reembed_after=args.reembed,
    )


def _train_encoder(args: argparse.Namespace, settings: Settings) -> int:
    """Train on a project (a job on the `reembed` queue) or on a folder (here)."""
    given = {
        "start": args.start,
        "epochs": args.epochs,
        "patience": args.patience,
        "batch_size": args.batch_size,
        "input_size": args.input_size,
        "freeze_blocks": args.freeze_blocks,
        "views": args.views,
        "lr": args.lr,
        "metric_weight": args.metric_weight,
        "val_fraction": args.val_fraction,
        "hflip": False if args.no_hflip else None,
        "tta_hflip": args.tta_hflip,
        "augment_strength": args.augment_strength,
        "ema_halflife_epochs": args.ema_halflife_epochs,
        "seed": args.seed,
        "select_by": args.select_by,
    }
    options: dict[str, Any] = {
        **{key: value for key, value in given.items() if value is not None},
        "device": args.device or settings.device,
        "min_per_class": args.min_per_class or settings.min_per_class,
    }
    if args.project:
        return print_job(
            settings,
            "train-encoder",
            no_wait=args.no_wait,
            project=args.project,
            fields=args.field,
            name=args.name,
            options=options,
            patient_key=args.patient_column,
            reembed_after=args.reembed,
        )
    if not (args.images and args.labels and args.field):
        raise ValueError("train-encoder needs --project, or --images, --labels and --field")
    if args.reembed:
        raise ValueError("--reembed needs --project (a folder has no collection to re-embed)")
    from workers.training import TrainOptions
    from workers.training.folder import FolderSource, train_on_folder

    source = FolderSource(
        args.images,
        args.labels,
        args.field,
        image_column=args.image_column,
        patient_column=args.patient_column,
        split_column=args.split_column,
        train_split=args.train_split,
    )
    samples, left_out = source.samples()
    if left_out:
        print(
            f"{left_out} row(s) outside the training split left out (never read)", file=sys.stderr
        )
    with tqdm(desc="train encoder") as bar:

        def show(progress: Any) -> None:
            bar.total, bar.n = progress.total, progress.done
            bar.set_postfix_str(progress.stage)
            bar.refresh()

        summary = train_on_folder(
            settings,
            source,
            samples,
            left_out,
            name=args.name,
            options=TrainOptions.from_settings(settings, options),
            on_progress=show,
        )
    print(json.dumps(summary, indent=2))
    return 0


def _download_weights(args: argparse.Namespace, settings: Settings) -> int:
    from echolabel.encoders import default_weights_dir
    from echolabel.encoders.weights import download_weights

    target = args.dir or settings.weights_dir or default_weights_dir()
    for path in download_weights(args.encoder, target):
        print(path)
    return 0


def _list_encoders(args: argparse.Namespace, settings: Settings) -> int:
    from echolabel.encoders import available_encoders

    for name in available_encoders():
        print(name + ("  (default)" if name == settings.encoder else ""))
    return 0
