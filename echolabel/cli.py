"""`echolabel`: serve the backend, index a folder, predict one image, fetch weights."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from tqdm import tqdm

from echolabel.logs import configure_logging
from echolabel.settings import ConfigError, Settings

INDEX_CHUNK = 64


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # reports record the command that produced them
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        if args.run is _doctor:
            from backend.doctor import BAD_CONFIGURATION, Check

            print(Check("configuration", False, str(exc), BAD_CONFIGURATION.fix).line())
            return 1
        print(f"echolabel: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    try:
        return int(args.run(args, settings) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the CLI prints the reason, never a traceback, for known errors
        from echolabel.core.errors import PermanentJobError
        from echolabel.encoders import EncoderError
        from echolabel.images import ImageError
        from echolabel.label_config import LabelConfigError, TaskError
        from echolabel.labelstudio import LabelStudioError
        from vectorstore import StoreError
        from workers.catalogue import JobFailedError

        if isinstance(
            exc,
            (
                LabelStudioError,
                ImageError,
                LabelConfigError,
                TaskError,
                StoreError,
                EncoderError,
                PermanentJobError,
                JobFailedError,
                FileNotFoundError,
                ValueError,
            ),
        ):
            print(f"echolabel: {exc}", file=sys.stderr)
            return 1
        raise


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="echolabel",
        description="Similarity-based pre-annotation for Label Studio. Configuration comes "
        "from the environment (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, MODEL_DIR, ...).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the Label Studio ML backend")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=9090)
    serve.set_defaults(run=_serve)

    health = sub.add_parser(
        "health", help="ask a running backend for /health (exit 1 unless it answers UP)"
    )
    health.add_argument("--url", default="http://127.0.0.1:9090", help="the backend's base URL")
    health.set_defaults(run=_health)

    demo = sub.add_parser(
        "demo", help="a real Label Studio with this backend connected, on a folder of images"
    )
    demo.add_argument("--images", type=Path, required=True, help="folder of images (read only)")
    demo.add_argument("--labels", type=Path, help="CSV with an `image` column and label fields")
    demo.add_argument("--field", action="append", default=[], help="a label column (repeat)")
    demo.add_argument(
        "--choices",
        type=lambda text: [c.strip() for c in text.split(",") if c.strip()],
        default=[],
        help="without --labels: the classes to annotate with, comma-separated (field `label`, "
        "or the one --field names)",
    )
    demo.add_argument(
        "--annotate", type=float, default=0.2, help="share of tasks annotated from the CSV"
    )
    demo.add_argument(
        "--home",
        type=Path,
        default=Path("~/.cache/echolabel/demo").expanduser(),
        help="where Label Studio's venv and the demo's data live",
    )
    demo.add_argument("--port", type=int, help="Label Studio's port (default: a free one)")
    demo.add_argument(
        "--exit-after-setup", action="store_true", help="stop everything once set up (tests)"
    )
    demo.set_defaults(run=_demo)

    doctor = sub.add_parser(
        "doctor", help="check the set-up step by step and say what to fix (exit 1 on a failure)"
    )
    doctor.add_argument("--project", type=int, help="also check this Label Studio project")
    doctor.add_argument(
        "--backend-url", help="the backend's URL as Label Studio knows it (webhook check)"
    )
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")
    doctor.add_argument(
        "--troubleshooting",
        action="store_true",
        help="print docs/troubleshooting.md's table (every way a check fails, and its fix)",
    )
    doctor.set_defaults(run=_doctor)

    connect = sub.add_parser(
        "connect",
        help="connect this backend to a Label Studio project (and let its webhook through "
        "basic auth)",
    )
    connect.add_argument("--project", type=int, required=True, help="Label Studio project id")
    connect.add_argument(
        "--backend-url",
        required=True,
        help="this backend's URL as Label Studio reaches it, e.g. http://backend:9090",
    )
    connect.add_argument("--title", default="echolabel")
    connect.set_defaults(run=_connect)

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
        "policy's points (ECHOLABEL_RETRAIN_GROWTH, ECHOLABEL_MIN_PER_CLASS; 0: skip it)",
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

    from echolabel import review_cli

    review_cli.add_parsers(sub)

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

    worker = sub.add_parser("worker", help="run an RQ worker (needs REDIS_URL)")
    worker.add_argument("queues", nargs="*", help="queues to work (default: all)")
    worker.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    worker.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), help="default: ECHOLABEL_DEVICE"
    )
    worker.set_defaults(run=_worker)

    migrate = sub.add_parser(
        "migrate-store",
        help="move MODEL_DIR/qdrant from qdrant-client's local mode onto Qdrant Edge (also "
        "done on the first start); the old store is kept as MODEL_DIR/qdrant.local-mode",
    )
    migrate.set_defaults(run=_migrate_store)

    reembed = sub.add_parser("reembed", help="re-embed a project with another encoder")
    reembed.add_argument("--project", required=True)
    reembed.add_argument("--encoder", required=True)
    reembed.add_argument("--no-wait", action="store_true", help="queue it and return")
    reembed.set_defaults(run=_reembed)

    train = sub.add_parser(
        "train-encoder",
        help="fine-tune an encoder on the labels of a project (or a folder + CSV) and save it "
        "under MODEL_DIR/encoders/<name>-v<N>/ as encoder trained:<name>-v<N>",
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
    train.add_argument("--val-fraction", type=float, help=recipe)
    train.add_argument("--no-hflip", action="store_true", help="no mirrored images")
    train.add_argument(
        "--tta-hflip",
        action=argparse.BooleanOptionalAction,
        help=f"embed each image as the mean of it and its mirror; {recipe}",
    )
    train.add_argument("--seed", type=int, help=recipe)
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

    preannotate = sub.add_parser(
        "preannotate",
        help="push predictions for every unlabelled task into Label Studio (background job)",
    )
    preannotate.add_argument("--project", type=int, required=True, help="Label Studio project")
    preannotate.add_argument(
        "--refresh",
        action="store_true",
        help="only update the predictions that label changes since the last push affect",
    )
    preannotate.add_argument("--no-wait", action="store_true", help="queue it and return")
    preannotate.set_defaults(run=_preannotate)

    diverse = sub.add_parser(
        "diverse-first",
        help="write the diverse-first labelling order into the task data of a Label Studio "
        "project (data.echolabel_diverse_first; Data Manager → Order by)",
    )
    diverse.add_argument("--project", type=int, required=True, help="Label Studio project")
    diverse.add_argument(
        "--limit", type=int, default=1000, help="rank the first N unlabelled tasks (default 1000)"
    )
    diverse.add_argument("--clear", action="store_true", help="remove the order from every task")
    diverse.add_argument("--no-wait", action="store_true", help="queue it and return")
    diverse.set_defaults(run=_diverse_first)

    retrain = sub.add_parser(
        "retrain",
        help="one round of the self-improving loop now: train a challenger on the project's "
        "labels, promote it only if it votes better on held-out images (docs/retraining.md)",
    )
    retrain.add_argument("--project", required=True)
    retrain.add_argument("--no-wait", action="store_true", help="queue it and return")
    retrain.set_defaults(run=_retrain)

    rollback = sub.add_parser(
        "rollback-encoder",
        help="go back to the encoder that was live before (or --encoder): zero-downtime "
        "re-embedding and a fresh push",
    )
    rollback.add_argument("--project", required=True)
    rollback.add_argument("--encoder", help="default: the previous live encoder")
    rollback.add_argument("--no-wait", action="store_true", help="queue it and return")
    rollback.set_defaults(run=_rollback_encoder)

    jobs = sub.add_parser(
        "jobs", help="queued, running and failed jobs with progress; retraining rounds"
    )
    jobs.add_argument("--json", action="store_true")
    jobs.add_argument(
        "--rounds", action="store_true", help="with --json: the retraining rounds' records"
    )
    jobs.set_defaults(run=_jobs)

    weights = sub.add_parser("weights", help="encoder weights")
    weights_sub = weights.add_subparsers(dest="weights_command", required=True)
    download = weights_sub.add_parser("download", help="download weights (needs internet)")
    download.add_argument("encoder")
    download.add_argument("--dir", type=Path, help="default: ECHOLABEL_WEIGHTS_DIR")
    download.set_defaults(run=_download_weights)
    listing = weights_sub.add_parser("list", help="list the registered encoders")
    listing.set_defaults(run=_list_encoders)

    _add_plugin_commands(sub)
    return parser


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from backend.app import create_app

    print(
        f"echolabel: serving on http://{args.host}:{args.port} "
        f"(encoder {settings.encoder}, data in {settings.model_dir.resolve()}, "
        f"store {'server ' + settings.qdrant_url if settings.qdrant_url else 'embedded'})",
        file=sys.stderr,
    )
    app = create_app(settings, listen_host=args.host)
    # On SIGTERM, requests still running after 3 s are cancelled (a /predict waits at most
    # ECHOLABEL_EMBED_WAIT_S; Label Studio asks again), so docker's 10 s grace period holds.
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3
    )
    return 0


def _health(args: argparse.Namespace, settings: Settings) -> int:
    """For container health checks: the backend's /health with its own basic auth."""
    import httpx

    auth = (settings.basic_auth_user, settings.basic_auth_pass or "")
    try:
        answer = httpx.get(
            f"{args.url.rstrip('/')}/health",
            auth=auth if settings.basic_auth_user else None,
            timeout=5.0,
        )
    except httpx.HTTPError as exc:
        print(f"echolabel: no answer from {args.url}: {exc}", file=sys.stderr)
        return 1
    print(answer.text)
    return 0 if answer.status_code == 200 and answer.json().get("status") == "UP" else 1


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from echolabel.demo import USER, running_demo

    if args.labels and not args.field:
        raise ValueError("with --labels, name the label columns to use with --field")
    if not args.labels:
        args.annotate = 0.0
        if len(args.field) > 1:
            raise ValueError("without --labels, --choices fills one field: give one --field")
    say = functools.partial(print, file=sys.stderr, flush=True)
    with running_demo(
        args.images,
        args.labels,
        args.field,
        home=args.home,
        annotate=args.annotate,
        choices=args.choices,
        port=args.port,
        say=say,
    ) as demo:
        print(
            f"\nOpen {demo.url}\n  user {USER}\n  password {demo.password}\n"
            f"{demo.tasks} tasks, {demo.annotated} annotated from the CSV"
            + (", the others pre-annotated" if demo.annotated else "")
            + f"; backend {demo.backend_url}\n",
            flush=True,
        )
        if args.exit_after_setup:
            return 0
        say("running until Ctrl-C")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            say("stopping Label Studio and the backend")
    return 0


def _doctor(args: argparse.Namespace, settings: Settings) -> int:
    from backend.doctor import Doctor, troubleshooting_markdown
    from workers.runtime import open_runtime

    if args.troubleshooting:
        print(troubleshooting_markdown(), end="")
        return 0
    with open_runtime(settings) as runtime:  # the store opens only if a check asks for it
        checker = Doctor(
            settings,
            store=lambda: runtime.store,
            load_weights=lambda: runtime.embedder.encoder(settings.encoder),
            fetcher=runtime.fetcher,
        )
        checks = checker.run(args.project, args.backend_url)
    if args.json:
        print(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        print("\n".join(c.line() for c in checks))
    return 0 if checker.healthy else 1


def _connect(args: argparse.Namespace, settings: Settings) -> int:
    from echolabel.labelstudio import LabelStudioClient

    client = LabelStudioClient(settings)
    url = args.backend_url.rstrip("/")
    basic_auth = (
        (settings.basic_auth_user, settings.basic_auth_pass or "")
        if settings.basic_auth_user
        else None
    )
    if any(b.get("url", "").rstrip("/") == url for b in client.backends(args.project)):
        print(f"echolabel: {url} is already connected to project {args.project}")
        if basic_auth:
            client.authorise_webhooks(args.project, url, basic_auth)
    else:
        client.connect_backend(args.project, url, args.title, basic_auth=basic_auth)
        print(f"echolabel: connected {url} to project {args.project}")
    if not client.webhooks_to(args.project, url):
        print(
            f"echolabel: project {args.project} has no webhook to {url}/webhook, so the backend "
            "will not learn from new annotations: Label Studio's SSRF protection refused the "
            "address (set SSRF_PROTECTION_ENABLED=false in Label Studio, or add the webhook "
            "under Settings → Webhooks)",
            file=sys.stderr,
        )
        return 1
    print(f"echolabel: webhook {url}/webhook present" + (" with basic auth" if basic_auth else ""))
    return 0


def _index(args: argparse.Namespace, settings: Settings) -> int:
    if args.images is None:
        if not args.project:
            raise ValueError("give a folder of images, or --project N for a Label Studio project")
        return _index_label_studio_project(args, settings)
    args.project = args.project or "local"
    return _index_folder(args, settings)


def _index_label_studio_project(args: argparse.Namespace, settings: Settings) -> int:
    """Pre-embed a Label Studio project's tasks so that its predictions are instant."""
    from echolabel.core.model import SimilarityModel
    from echolabel.core.projects import project_id
    from echolabel.embedding import TaskImage
    from echolabel.label_config import TaskError, parse_label_config
    from echolabel.labelstudio import LabelStudioClient
    from workers.runtime import open_runtime, redis_dispatcher

    project = project_id(args.project)
    client = LabelStudioClient(settings)
    try:
        schema = parse_label_config(client.label_config(project))
        items, skipped = [], 0
        for task in client.tasks(project):
            try:
                items.append(TaskImage(task["id"], schema.image_ref(task)))
            except (TaskError, KeyError):
                skipped += 1
    finally:
        client.close()
    items = items[: args.limit]
    with open_runtime(settings) as runtime:
        dispatcher = redis_dispatcher(runtime)
        if dispatcher is not None:
            # The workers embed; the process holding the store (backend or a worker with a
            # Qdrant server) stores the vectors. The project's encoder is the configured one.
            jobs = dispatcher.enqueue(project, settings.encoder, items)
            print(
                json.dumps(
                    {
                        "project": project,
                        "tasks": len(items),
                        "skipped": skipped,
                        "jobs": len(jobs),
                    },
                    indent=2,
                )
            )
            return 0
        model = SimilarityModel(runtime, project)
        known = runtime.store.has_vectors(project, [i.task for i in items])
        todo = [i for i in items if i.task not in known]
        failed: dict[str, str] = {}
        with tqdm(total=len(todo), unit="img", desc=f"index {project}") as bar:
            for start in range(0, len(todo), INDEX_CHUNK):
                chunk = todo[start : start + INDEX_CHUNK]
                report = model.embed(chunk)
                failed.update({str(t): str(e) for t, e in report.failures.items()})
                bar.update(len(chunk))
        print(
            json.dumps(
                {
                    "project": project,
                    "tasks": len(items),
                    "skipped": skipped,
                    "already_embedded": len(known),
                    "points": runtime.store.count(project),
                    "failed": failed,
                },
                indent=2,
            )
        )
        return 0


def _index_folder(args: argparse.Namespace, settings: Settings) -> int:
    from echolabel.core.model import SimilarityModel
    from echolabel.embedding import TaskImage
    from echolabel.folders import read_folder
    from echolabel.label_config import ChoicesField, LabelSchema
    from workers.runtime import open_runtime

    items = read_folder(
        args.images, args.labels, image_column=args.image_column, fields=tuple(args.field)
    )[: args.limit]
    # The folder is the only place this command reads images from; it embeds here (a folder
    # is indexed before any server runs, so this process holds the store).
    settings = dataclasses.replace(settings, local_files_root=args.images.resolve(), redis_url=None)
    with open_runtime(settings) as runtime:
        # The store first: one that a running server holds refuses before anything is written.
        model = SimilarityModel(runtime, args.project)
        if args.field:
            classes = {f: sorted({i.labels[f] for i in items if f in i.labels}) for f in args.field}
            runtime.projects.save(
                args.project,
                LabelSchema(
                    "image",
                    "image",
                    tuple(ChoicesField(f, "image", tuple(classes[f])) for f in args.field),
                ),
            )
        failures: dict[str, str] = {}
        with tqdm(total=len(items), unit="img", desc=f"index {args.project}") as bar:
            for start in range(0, len(items), INDEX_CHUNK):
                chunk = [
                    TaskImage(task=i.task, image=str(i.path), labels=i.labels)
                    for i in items[start : start + INDEX_CHUNK]
                ]
                result = model.embed(chunk)
                failures.update({str(t): str(e) for t, e in result.failures.items()})
                bar.update(len(chunk))
        store = runtime.store
        print(
            json.dumps(
                {
                    "project": args.project,
                    "points": store.count(args.project),
                    "labelled": store.count(args.project, labelled=True),
                    "failed": failures,
                },
                indent=2,
            )
        )
        return 1 if failures and len(failures) == len(items) else 0


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
        image = runtime.fetcher.load(str(path))
        vector = runtime.embedder.embed_images(model.encoder_name, [image])[0]
        suggestion = model.suggest(vector, exclude_images=[str(path)])
        out: dict[str, Any] = {
            "image": str(path),
            "model_version": model.model_version,
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
        print(json.dumps(out, indent=2))
        return 0


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    import shlex

    from echolabel.folders import read_folder
    from workers.evaluation.report import headline, write_report
    from workers.evaluation.retraining_curve import retraining_table
    from workers.evaluation.runner import RetrainingReplay, evaluate_folder
    from workers.review.duplicates import DEFAULT_THRESHOLD
    from workers.training import TrainOptions
    from workers.training.selection import RetrainPolicy

    if args.exclude_near_duplicates == "default":
        args.exclude_near_duplicates = DEFAULT_THRESHOLD
    if args.project:
        return _evaluate_project(args, settings)
    if not (args.images and args.labels and args.field and args.out):
        raise ValueError("evaluate needs --images, --labels, --field and --out (or --project)")
    items = _with_groups(
        read_folder(
            args.images,
            args.labels,
            image_column=args.image_column,
            fields=tuple(args.field),
            group_column=args.patient_column,
            where=_column_values(args.where),
        ),
        args.group_map,
    )
    fields = [*args.field, *(f"{spec.split('=', 1)[0]}_group" for spec in args.group_map)]
    encoders = [e.strip() for e in (args.encoders or settings.encoder).split(",") if e.strip()]
    with tqdm(total=len(items) * len(encoders), unit="img", desc="evaluate") as bar:

        def show(encoder: str, count: int) -> None:
            bar.set_postfix(encoder=encoder)
            bar.update(count)

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
            retraining=RetrainingReplay(
                policy=RetrainPolicy.from_settings(settings),
                options=TrainOptions(
                    **{
                        "min_per_class": settings.min_per_class,
                        "device": settings.device,
                        **_train_options(args.retrain_option),
                    }
                ),
                seeds=range(args.retraining_seeds),
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


def _evaluate_volumes(args: argparse.Namespace, settings: Settings) -> int:
    import shlex

    from echolabel.folders import read_folder
    from echolabel.volumes import Sampling
    from workers.evaluation.report import headline, write_report
    from workers.evaluation.volumes import evaluate_volumes, volume_headline

    samplings = [Sampling.parse(spec) for spec in args.sampling.split(",") if spec.strip()]
    items = read_folder(
        args.volumes, args.labels, image_column=args.volume_column, fields=tuple(args.field)
    )
    encoders = [e.strip() for e in (args.encoders or settings.encoder).split(",") if e.strip()]
    with tqdm(total=len(items) * len(encoders), unit="volume", desc="evaluate-volumes") as bar:

        def show(encoder: str, count: int) -> None:
            bar.set_postfix(encoder=encoder)
            bar.update(count)

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


def _train_options(specs: Sequence[str]) -> dict[str, Any]:
    """`epochs=5` → {"epochs": 5}: names are TrainOptions fields, values JSON or text."""
    from workers.training import TrainOptions

    names = {f.name for f in dataclasses.fields(TrainOptions)}
    out: dict[str, Any] = {}
    for name, value in _column_values(specs, flag="--retrain-option").items():
        if name not in names:
            raise ValueError(
                f"--retrain-option {name}: not a training option; one of {sorted(names)}"
            )
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value  # a word, e.g. start=efficientnet_lite2
    return out


def _column_values(specs: Sequence[str], flag: str = "--where") -> dict[str, str]:
    """`--where split=train` → {"split": "train"}."""
    pairs = [spec.partition("=") for spec in specs]
    bad = [spec for spec, (_, sep, _) in zip(specs, pairs, strict=True) if not sep]
    if bad:
        raise ValueError(f"{flag} {bad[0]!r}: expected NAME=VALUE")
    return {column: value for column, _, value in pairs}


def _with_groups(items: list[Any], specs: Sequence[str]) -> list[Any]:
    """Add `<field>_group` labels from `FIELD=CSV` mappings (two columns: label, group)."""
    for spec in specs:
        field_name, _, path = spec.partition("=")
        if not path:
            raise ValueError(f"--group-map {spec!r}: expected FIELD=path/to/mapping.csv")
        with open(path, newline="") as handle:
            mapping = {row[0]: row[1] for row in csv.reader(handle) if len(row) >= 2}
        items = [
            dataclasses.replace(
                item,
                labels={**item.labels, f"{field_name}_group": mapping[item.labels[field_name]]},
            )
            if item.labels.get(field_name) in mapping
            else item
            for item in items
        ]
    return items


def _evaluate_project(args: argparse.Namespace, settings: Settings) -> int:
    """The report of a project in the store: queued to the `evaluate` workers with Redis."""
    from echolabel.core.projects import project_id
    from echolabel.follow import run_job

    result = run_job(
        settings,
        "evaluate",
        project=project_id(args.project),
        k=args.k,
        min_class_size=args.min_class_size,
        near_duplicate_threshold=args.exclude_near_duplicates,
        learning_curve_seeds=args.learning_curve,
    )
    print(result["headline"])
    print(f"\n{result['report_json']}\n{result['report_html']}", file=sys.stderr)
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from workers.worker import run_worker

    run_worker(settings, args.queues or None, burst=args.burst, device=args.device)
    return 0


def _migrate_store(args: argparse.Namespace, settings: Settings) -> int:
    """Migrate the embedded store to Qdrant Edge now (the backend would on its first start)."""
    from vectorstore.migrate import migrate_local_store

    if settings.qdrant_url:
        print("echolabel: QDRANT_URL is set: the store is a Qdrant server, nothing to migrate")
        return 0
    report = migrate_local_store(
        settings.qdrant_path, exact_max_points=settings.exact_search_max_points
    )
    if report is None:
        print(f"{settings.qdrant_path}: no local-mode store to migrate (already Qdrant Edge)")
        return 0
    print(report.summary())
    return 0


def _reembed(args: argparse.Namespace, settings: Settings) -> int:
    """Queue the re-embedding and follow its progress (Ctrl-C detaches, the job goes on)."""
    from echolabel.core.projects import project_id

    return _print_job(
        settings,
        "reembed",
        no_wait=args.no_wait,
        project=project_id(args.project),
        encoder=args.encoder,
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
        "seed": args.seed,
    }
    options: dict[str, Any] = {
        **{key: value for key, value in given.items() if value is not None},
        "device": args.device or settings.device,
        "min_per_class": args.min_per_class or settings.min_per_class,
    }
    if args.project:
        from echolabel.core.projects import project_id

        return _print_job(
            settings,
            "train-encoder",
            no_wait=args.no_wait,
            project=project_id(args.project),
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
    from workers.runtime import open_runtime
    from workers.training import TrainOptions, train_encoder
    from workers.training.sources import folder_samples

    root = args.images.resolve()
    samples, left_out = folder_samples(
        root,
        args.labels,
        args.field,
        image_column=args.image_column,
        patient_column=args.patient_column,
        split_column=args.split_column,
        train_split=args.train_split,
    )
    if left_out:
        print(
            f"{left_out} row(s) outside the training split left out (never read)", file=sys.stderr
        )
    folder_settings = dataclasses.replace(settings, local_files_root=root)
    with open_runtime(folder_settings) as runtime, tqdm(desc="train encoder") as bar:

        def show(progress: Any) -> None:
            bar.total, bar.n = progress.total, progress.done
            bar.set_postfix_str(progress.stage)
            bar.refresh()

        summary = train_encoder(
            samples,
            args.field,
            fetcher=runtime.fetcher,
            encoders_dir=settings.encoders_dir,
            name=args.name or root.name,
            options=TrainOptions(**options),
            source={
                "kind": "folder",
                "images": str(root),
                "labels": str(args.labels.resolve()),
                "split_column": args.split_column,
                "train_split": args.train_split,
                "rows_left_out": left_out,
            },
            on_progress=show,
        )
    print(json.dumps(summary, indent=2))
    return 0


def _preannotate(args: argparse.Namespace, settings: Settings) -> int:
    """Push predictions into Label Studio (or refresh them) and follow the progress."""
    name = "refresh" if args.refresh else "preannotate"
    return _print_job(settings, name, no_wait=args.no_wait, project=args.project)


def _diverse_first(args: argparse.Namespace, settings: Settings) -> int:
    """Write (or clear) the diverse-first order and follow the progress."""
    return _print_job(
        settings,
        "diverse-first",
        no_wait=args.no_wait,
        project=args.project,
        limit=args.limit,
        clear=args.clear,
    )


def _print_job(settings: Settings, job: str, /, *, no_wait: bool, **arguments: Any) -> int:
    """Run a catalogue job here or on the workers (echolabel.follow) and print its result."""
    from echolabel.follow import run_job

    result = run_job(settings, job, no_wait=no_wait, **arguments)
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


def _retrain(args: argparse.Namespace, settings: Settings) -> int:
    """Run one retraining round (even with ECHOLABEL_AUTO_RETRAIN=0: asked for by hand)."""
    from echolabel.core.projects import project_id

    settings = dataclasses.replace(settings, auto_retrain=True)
    return _print_job(settings, "retrain", no_wait=args.no_wait, project=project_id(args.project))


def _rollback_encoder(args: argparse.Namespace, settings: Settings) -> int:
    from echolabel.core.projects import project_id

    return _print_job(
        settings,
        "rollback-encoder",
        no_wait=args.no_wait,
        project=project_id(args.project),
        encoder=args.encoder,
    )


def _jobs(args: argparse.Namespace, settings: Settings) -> int:
    from workers.queues import connect, list_rq_jobs
    from workers.training.selection import SelectionLog

    rounds = SelectionLog(settings.selection_dir).all_projects()
    listed = (
        list_rq_jobs(connect(settings.redis_url)) if settings.redis_url and not args.rounds else []
    )
    if args.json:
        print(json.dumps({"retraining": rounds} if args.rounds else listed, indent=2))
        return 0 if settings.redis_url or args.rounds else 1
    if not settings.redis_url:
        print("REDIS_URL is not set: jobs run in the backend; see GET /jobs", file=sys.stderr)
    for job in listed:
        progress = job["progress"]
        done = f"{progress.get('done', '')}/{progress.get('total', '')}" if progress else ""
        print(
            f"{job['status']:9} {job['queue']:9} {job['id']:40} {done:12} "
            f"{job['error'] or job['description'] or ''}"
        )
    for project, state in rounds.items():
        live = state["live"]["encoder"] if state["live"] else "the first encoder"
        print(f"\nproject {project}: live encoder {live}; retraining rounds:")
        for c in state["candidates"]:
            print(
                f"  {c['started_at']}  {c['labelled']:>6} labelled  {c['decision']:11} "
                f"{c['challenger'] or '':28} {c['reason']}"
            )
    return 0 if settings.redis_url else 1


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


def _add_plugin_commands(sub: Any) -> None:
    """Subcommands that other packages add through the `echolabel.commands` entry points
    (pyproject.toml): `bench` comes from bench/, which imports the product, never the reverse."""
    for entry in sorted(entry_points(group="echolabel.commands"), key=lambda e: e.name):
        entry.load()(sub)


if __name__ == "__main__":
    raise SystemExit(main())
