"""RQ job functions: plain functions with plain arguments (ids, names, image references).

They run in an RQ worker, in the backend's own process, or inline from the CLI alike, on the
process's runtime (workers.runtime.current); workers/catalogue.py says how each one travels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from rq import get_current_job

from echolabel.core.diverse_first import DEFAULT_LIMIT, clear_tasks, order_tasks
from echolabel.core.errors import PermanentJobError, TransientJobError
from echolabel.core.preannotate import PreAnnotator, PushProgress
from echolabel.embedding import TaskImage
from echolabel.labelstudio import LabelStudioClient, LabelStudioUnavailable
from echolabel.settings import Settings
from vectorstore import Annotation, Point, StoreError
from workers.reembed import Progress, reembed_project
from workers.results import EmbedMessage, ResultList
from workers.runtime import current

log = logging.getLogger(__name__)

# Image failures worth retrying: the source may come back. Anything else is the image itself.
TRANSIENT_IMAGE_REASONS = {"unreachable"}


def _no_retry() -> None:
    job = get_current_job()
    if job is not None:
        job.retries_left = 0  # read by the worker when it handles this failure


def _task_image(raw: Mapping[str, Any]) -> TaskImage:
    return TaskImage(
        task=raw["task"],
        image=raw["image"],
        labels=dict(raw.get("labels") or {}),
        annotation=Annotation(raw.get("annotation_id"), raw.get("annotation_updated_at")),
    )


def embed_batch(
    project: int | str,
    encoder: str,
    tasks: Sequence[Mapping[str, Any]],
    reply_to: str | None = None,
) -> dict:
    """Embed a batch of tasks with `encoder`.

    Upserts the points itself where this process may write the store; otherwise pushes them
    onto `reply_to` (workers.results) for the store's owner to upsert. Either way the owner
    hears of the result there. Failed images are listed in `failed`.
    """
    runtime = current()
    items = [_task_image(t) for t in tasks]
    result = runtime.embedder.embed_tasks(encoder, items, runtime.fetcher.load)
    transient = {t: e for t, e in result.failures.items() if e.reason in TRANSIENT_IMAGE_REASONS}
    if transient:
        raise TransientJobError(
            f"{len(transient)} image(s) could not be fetched, will retry: "
            + "; ".join(str(e) for e in list(transient.values())[:3])
        )
    failed = {str(t): {"reason": e.reason, "detail": str(e)} for t, e in result.failures.items()}
    if not result.points:
        _no_retry()
        raise PermanentJobError(
            f"every image of the batch failed (project {project}): "
            + "; ".join(f"{f['reason']}: {f['detail']}" for f in failed.values())
        )
    model = runtime.embedder.encoder(encoder)
    job = get_current_job()
    message = EmbedMessage(
        job=job.id if job else "",
        project=project,
        encoder=encoder,
        dim=model.dim,
        weights_id=model.weights_id,
        failed=failed,
    )
    summary: dict[str, Any] = {"failed": failed, "loads": runtime.embedder.loads}
    if runtime.writes_store:
        runtime.store.ensure_collection(project, encoder, model.dim, model.weights_id)
        runtime.store.upsert(project, encoder, result.points)
        summary["stored"] = [p.task for p in result.points]
        # The owner only needs to hear of labels (a delete may have overtaken them).
        message.stored = {p.task: p.annotation.id for p in result.points if p.labelled}
    elif reply_to is None or job is None:
        _no_retry()
        raise PermanentJobError(
            "this worker may not write the embedded store and the job names no reply list: "
            "enqueue embedding with workers.catalogue.enqueue_embed"
        )
    else:
        message.points = result.points
        summary["sent"] = len(result.points)
    if reply_to is not None and job is not None and (message.points or message.stored):
        # The job's last act: the owner may apply it before RQ marks the job finished.
        ResultList(job.connection, reply_to).push(message)
    return summary


def reembed(
    project: int | str,
    encoder: str,
    on_progress: Callable[[Progress], None] | None = None,
) -> dict:
    """Re-embed a project with `encoder` (zero downtime); progress in the job's meta
    (or to `on_progress` when run in process without RQ).

    Runs where the store may be written: any worker with a Qdrant server; with the embedded
    store, the process that holds it (the backend's in-process worker, or a worker alone).
    """
    runtime = current()
    try:
        store = runtime.store
    except StoreError as exc:
        _no_retry()
        raise PermanentJobError(str(exc)) from None
    report = _meta_reporter(on_progress)
    done = reembed_project(
        store,
        runtime.embedder,
        runtime.fetcher.load,
        project,
        encoder,
        batch_size=runtime.settings.batch_size,
        on_progress=report,
        derive=_centring_of_live(runtime.settings.encoders_dir, store, project, encoder),
    )
    return done.as_meta()


def _centring_of_live(
    encoders_dir: Path, store: Any, project: int | str, encoder: str
) -> Callable[[np.ndarray], np.ndarray] | None:
    """When `encoder` is the live encoder centred (same base, same weights), its vectors are
    the live ones centred: no image is read or embedded again."""
    from echolabel.encoders.centred import centre_rows, centred_config

    config = centred_config(encoders_dir, encoder)
    live = store.collection(project)
    if config is None or live is None:
        return None
    if (live.encoder, live.weights_id) != (config["start"], config["start_weights_id"]):
        return None
    return lambda rows: centre_rows(rows, config["centre"])


def train_encoder(
    project: int | str,
    fields: Sequence[str] = (),
    name: str | None = None,
    options: Mapping[str, Any] | None = None,
    patient_key: str | None = None,
    reembed_after: bool = False,
    on_progress: Callable[[Any], None] | None = None,
) -> dict:
    """Fine-tune an encoder on the labelled tasks of a project (labels and image references
    from its live generation, images through the ImageFetcher) and save it under
    <artefacts>/encoders/<name>-v<N>/; with `reembed_after`, re-embed the project with it.

    Progress (stage, epoch, loss, validation accuracy, ETA) goes to the job's meta or to
    `on_progress`. `options` are TrainOptions fields over the settings' (device, minimum per
    class, vote).
    """
    from workers.training import TrainingRefused, TrainOptions
    from workers.training import train_encoder as fit
    from workers.training.sources import project_samples

    runtime = current()
    settings = runtime.settings
    report = _meta_reporter(on_progress)
    info = runtime.store.collection(project)
    try:
        samples, fields = project_samples(runtime.store, project, fields, patient_key)
        summary = fit(
            samples,
            fields,
            fetcher=runtime.fetcher,
            encoders_dir=settings.encoders_dir,
            name=name or f"project-{project}",
            options=TrainOptions.from_settings(settings, options),
            source={
                "kind": "project",
                "project": str(project),
                "generation": info.generation if info else None,
                "encoder": info.encoder if info else None,
                "patient_key": patient_key,
            },
            on_progress=report,
        )
    except (TrainingRefused, ValueError, TypeError) as exc:  # TypeError: an unknown option
        _no_retry()  # more labels or other options, not a retry, can fix it
        raise PermanentJobError(str(exc)) from None
    if reembed_after:
        # reembed() reports to the job's meta itself.
        summary["reembed"] = reembed(project, summary["encoder"], on_progress=on_progress)
    return summary


def centre_encoder(
    project: int | str,
    reembed_after: bool = False,
    on_progress: Callable[[Any], None] | None = None,
) -> dict:
    """Centre the project's pretrained encoder on its own images (echolabel.encoders.centred):
    the mean of every stored vector of its live generation, labelled or not, saved under
    <artefacts>/encoders/project-<id>-centred-v<N>/. With `reembed_after`, switch the project
    to it as a promotion does (zero-downtime re-embedding, a fresh push where predictions were
    pushed), recorded as "centred" in its encoder selection."""
    from echolabel.encoders.centred import can_centre, fit_centre, save_centred
    from workers.training.selection import Candidate, SelectionLog

    runtime = current()
    started = _now()
    info = runtime.store.collection(project)
    if info is None:
        _no_retry()
        raise PermanentJobError(f"project {project} has no collection: index it first")
    if not can_centre(info.encoder):
        _no_retry()
        raise PermanentJobError(
            f"project {project} runs on {info.encoder}: only a pretrained encoder is centred "
            "(a trained one gained nothing on validation; docs/evaluation.md)"
        )
    if not runtime.store.count(project):
        _no_retry()
        raise PermanentJobError(f"project {project} has no embedded image to centre on")
    images = 0

    def stored_vectors() -> Iterator[np.ndarray]:
        # Counted as they are read: points added meanwhile are in the mean and in the count.
        nonlocal images
        for point in runtime.store.iter_points(project, with_vectors=True, collection=info):
            images += 1
            yield point.vector

    centre = fit_centre(stored_vectors())
    name = save_centred(
        runtime.settings.encoders_dir,
        f"project-{project}-centred",
        start=info.encoder,
        start_weights_id=info.weights_id,
        centre=centre,
        images=images,
        source={"project": str(project), "generation": info.generation},
    )
    log.info("encoder centred", extra={"project": str(project), "encoder": name})
    summary: dict[str, Any] = {"encoder": name, "images": images, "start": info.encoder}
    if reembed_after:
        candidate = Candidate(
            challenger=name,
            champion=info.encoder,
            labelled=runtime.store.count(project, labelled=True),
            started_at=started,
            decision="centred",
            reason=f"{info.encoder} centred on the project's {images} images (label-free)",
        )
        selection = SelectionLog(runtime.settings.selection_dir)
        switched = _switch_encoder(project, name, selection, candidate, on_progress)
        summary["reembed"] = switched.details.get("reembed")
        summary["push"] = switched.details.get("push")
    return summary


def evaluate_project(
    project: int | str,
    k: int = 10,
    min_class_size: int = 20,
    near_duplicate_threshold: float | None = None,
    learning_curve_seeds: int = 0,
) -> dict:
    """The evaluation report of a project's labelled points (labels from the store, vectors
    of its live generation), written under <artefacts>/reports/<project>/<time>/; optionally
    without near-duplicate neighbours, and with a learning curve over that many seeds."""
    from workers.evaluation.held_out import held_out, note, trained_on
    from workers.evaluation.report import evaluate_vectors, headline, new_report, write_report

    runtime = current()
    points = _labelled_points(project, "evaluate")
    info = runtime.store.collection(project)
    assert info is not None  # _labelled_points refused a project without one
    # A trained live encoder is measured only on images it was not trained on (by content:
    # the same image under another task id is still left out).
    trained = trained_on([info.encoder], runtime.settings.encoders_dir)
    fetch = runtime.fetcher.fetch_bytes
    points, excluded = held_out(points, trained.values(), lambda p: fetch(p.image))
    if len(points) < 2:
        _no_retry()
        raise PermanentJobError(
            f"project {project} has {len(points)} labelled task(s) not used to train "
            f"{info.encoder}: need 2+"
        )
    fields = _fields(points)
    settings = runtime.settings
    result = evaluate_vectors(
        np.stack([p.vector for p in points]),
        {name: [p.labels.get(name) for p in points] for name in fields},
        k=k,
        min_class_size=min_class_size,
        min_neighbours=settings.min_neighbours,
        min_score=settings.min_score,
        near_duplicate_threshold=near_duplicate_threshold,
        learning_curve_seeds=range(learning_curve_seeds),
    )
    report = new_report(
        command=f"evaluate_project({project!r}, k={k}, min_class_size={min_class_size}, "
        f"near_duplicate_threshold={near_duplicate_threshold}, "
        f"learning_curve_seeds={learning_curve_seeds})",
        k=k,
        min_neighbours=settings.min_neighbours,
        min_score=settings.min_score,
        min_class_size=min_class_size,
        dataset={
            "description": f"project {project}, generation {info.generation}",
            "items": len(points),
            "fingerprint": _fingerprint(points),
            "groups": False,
            "fields": fields,
        },
    )
    note(report, trained, excluded)
    report["encoders"][info.encoder] = {
        "encoder": info.encoder,
        "weights_id": info.weights_id,
        "dim": info.dim,
        "images": len(points),
        "failed": {},
        **({"trained": trained[info.encoder].describe()} if trained else {}),
        **result,
    }
    json_path, html_path = write_report(report, _output_dir(settings, "reports", project))
    return {
        "report_json": str(json_path),
        "report_html": str(html_path),
        "headline": headline(report),
    }


def _fingerprint(points: Sequence[Point]) -> str:
    digest = hashlib.sha256()
    for point in sorted(points, key=lambda p: str(p.task)):
        digest.update(f"{point.task}\t{sorted(point.labels.items())}\n".encode())
    return digest.hexdigest()[:16]


def review_project(project: int | str, k: int = 10) -> dict:
    """Label QA of a project's labelled tasks (vectors of its live generation, labels from
    the store): review.csv and review.json under <artefacts>/reviews/<project>/<time>/."""
    from workers.review import browser_label_studio_url, task_link
    from workers.review.label_issues import review, summary, write_review

    points = _labelled_points(project, "review")
    settings = current().settings
    result = review(
        np.stack([p.vector for p in points]),
        {name: [p.labels.get(name) for p in points] for name in _fields(points)},
        [p.task for p in points],
        k=k,
        link=lambda task: task_link(browser_label_studio_url(settings), project, task),
    )
    result["project"] = project
    csv_path, json_path = write_review(result, _output_dir(settings, "reviews", project))
    return {
        "review_csv": str(csv_path),
        "review_json": str(json_path),
        "flagged": {name: f["flagged"] for name, f in result["fields"].items()},
        "headline": summary(result),
    }


def find_project_duplicates(project: int | str, threshold: float | None = None) -> dict:
    """Near-duplicate pairs among all of a project's embedded tasks (JSON-able, for a page or
    the CLI): see workers.review.duplicates.find_duplicates."""
    from echolabel.encoders.centred import centred_config, uncentre_rows
    from workers.review import browser_label_studio_url, task_link
    from workers.review.duplicates import DEFAULT_THRESHOLD, find_duplicates

    store = current().store
    if store.collection(project) is None:
        _no_retry()
        raise PermanentJobError(f"project {project} has no collection: nothing to compare")
    points = list(store.iter_points(project))
    if len(points) < 2:
        _no_retry()
        raise PermanentJobError(f"project {project} has {len(points)} task(s): need 2+")
    settings = current().settings
    vectors = np.stack([p.vector for p in points])
    centred = centred_config(settings.encoders_dir, store.collection(project).encoder)
    if centred is not None:  # the threshold is the base encoder's (docs/review.md)
        vectors = uncentre_rows(vectors, centred["centre"])
    result = find_duplicates(
        vectors,
        [p.task for p in points],
        [p.labels for p in points],
        threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
        link=lambda task: task_link(browser_label_studio_url(settings), project, task),
    )
    return {"project": project, **result}


def _output_dir(settings: Settings, kind: str, project: int | str) -> Path:
    """<artefacts>/<kind>/<project>/<UTC time>/: one folder per run, newest last by name."""
    return settings.artefacts / kind / str(project) / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _labelled_points(project: int | str, what: str) -> list[Point]:
    store = current().store
    if store.collection(project) is None:
        _no_retry()
        raise PermanentJobError(f"project {project} has no collection: nothing to {what}")
    points = list(store.iter_points(project, labelled=True))
    if len(points) < 2:
        _no_retry()
        raise PermanentJobError(f"project {project} has {len(points)} labelled task(s): need 2+")
    return points


def _fields(points: Sequence[Point]) -> list[str]:
    return sorted({name for p in points for name in p.labels})


def retrain_round(
    project: int | str, on_progress: Callable[[Any], None] | None = None
) -> dict[str, Any]:
    """One round of the self-improving loop (workers/training/retraining.py): train a
    challenger, score it against the live encoder, and promote it only when it wins: a
    zero-downtime re-embedding, then a fresh push where predictions were pushed before. Every
    round's record is in the selection log (admin page, `echolabel jobs`)."""
    from workers.training import TrainOptions
    from workers.training.retraining import run_round
    from workers.training.selection import Candidate, RetrainPolicy, SelectionLog

    runtime = current()
    settings = runtime.settings
    selection = SelectionLog(settings.selection_dir)
    started = _now()
    try:
        candidate = run_round(
            store=runtime.store,
            embedder=runtime.embedder,
            fetcher=runtime.fetcher,
            encoders_dir=settings.encoders_dir,
            selection=selection,
            project=project,
            policy=RetrainPolicy.from_settings(settings),
            options=TrainOptions.for_retraining(settings),
            patient_key=settings.patient_key,
            on_progress=_meta_reporter(on_progress),
        )
    except Exception as exc:
        info = runtime.store.collection(project)
        selection.record(
            project,
            Candidate(
                challenger=None,
                champion=info.encoder if info else "",
                labelled=runtime.store.count(project, labelled=True) if info else 0,
                started_at=started,
                decision="failed",
                reason=f"{type(exc).__name__}: {exc}",
            ),
        )
        raise
    if candidate.decision == "promoted" and candidate.challenger:
        candidate = _switch_encoder(project, candidate.challenger, selection, candidate)
    return dataclasses.asdict(candidate)


def rollback_encoder(project: int | str, encoder: str | None = None) -> dict[str, Any]:
    """Go back to `encoder`, or to the encoder that was live before the current one: the same
    zero-downtime re-embedding and push as a promotion, recorded as "rolled back"."""
    from workers.training.selection import Candidate, SelectionLog

    runtime = current()
    selection = SelectionLog(runtime.settings.selection_dir)
    info = runtime.store.collection(project)
    if info is None:
        _no_retry()
        raise PermanentJobError(f"project {project} has no collection")
    target = encoder or selection.previous_encoder(project)
    if target is None:
        _no_retry()
        raise PermanentJobError(
            f"project {project}: no earlier encoder to go back to (name one with --encoder)"
        )
    candidate = Candidate(
        challenger=target,
        champion=info.encoder,
        labelled=runtime.store.count(project, labelled=True),
        started_at=_now(),
        decision="rolled back",
        reason=f"rolled back from {info.encoder} to {target} by an admin",
    )
    return dataclasses.asdict(_switch_encoder(project, target, selection, candidate))


def build_vote_index(project: int | str) -> dict[str, Any]:
    """Build the project's vote index where its labels outgrew it (VectorStore.build_index)."""
    store = current().store
    began = time.monotonic()
    built = store.build_index(project)
    return {
        "project": project,
        "built": built,
        "labelled": store.count(project, labelled=True),
        "build_s": round(time.monotonic() - began, 2),
    }


def _switch_encoder(
    project: int | str,
    encoder: str,
    selection: Any,
    candidate: Any,
    on_progress: Callable[[Any], None] | None = None,
) -> Any:
    """Re-embed with `encoder` (zero downtime), push again where predictions were pushed, then
    record the switch; a failed re-embedding is recorded as "failed" and raised."""
    from workers.catalogue import job_spec
    from workers.runtime import run_here

    runtime = current()
    before = runtime.store.collection(project)
    try:
        switched = reembed(project, encoder, on_progress=on_progress)
    except Exception as exc:
        selection.record(
            project,
            dataclasses.replace(
                candidate, decision="failed", reason=f"re-embedding with {encoder} failed: {exc}"
            ),
        )
        raise
    details = {**candidate.details, "reembed": switched.get("stage")}
    if before is not None and before.published_version:
        # The push votes every unlabelled task with the new encoder under a new version.
        try:
            details["push"] = run_here(runtime, job_spec("preannotate"), {"project": project})
        except Exception as exc:  # the switch is live; the push can be started again by hand
            details["push_error"] = f"{type(exc).__name__}: {exc}"
            log.warning("push after encoder switch failed", extra={"error": str(exc)})
    candidate = dataclasses.replace(candidate, details=details)
    selection.record(project, candidate)
    return candidate


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


def _meta_reporter(on_progress: Callable[[Any], None] | None) -> Callable[[Any], None]:
    """Progress to `on_progress` and to the current RQ job's meta."""
    job = get_current_job()

    def report(progress: Any) -> None:
        if on_progress is not None:
            on_progress(progress)
        if job is not None:
            job.meta["progress"] = progress.as_meta()
            job.save_meta()

    return report


# -- pre-annotation jobs (RQ queue `preannotate`, or a thread of the backend without Redis) --


@contextmanager
def _pre_annotator(
    project: int | str, on_progress: Callable[[Any], None] | None
) -> Iterator[PreAnnotator]:
    runtime = current()
    client = LabelStudioClient(runtime.settings)
    try:
        # A job embeds what it needs itself: it runs where the work is meant to happen.
        yield PreAnnotator(runtime.inline(), client, int(project), _meta_reporter(on_progress))
    except LabelStudioUnavailable as exc:
        raise TransientJobError(str(exc)) from None
    finally:
        client.close()


def preannotate_project(
    project: int | str, on_progress: Callable[[PushProgress], None] | None = None
) -> dict[str, Any]:
    """Push predictions for every unlabelled task of a Label Studio project."""
    with _pre_annotator(project, on_progress) as annotator:
        return annotator.push()


def refresh_project(
    project: int | str, on_progress: Callable[[PushProgress], None] | None = None
) -> dict[str, Any]:
    """Update the pushed predictions that the label changes since the last refresh affect."""
    with _pre_annotator(project, on_progress) as annotator:
        return annotator.refresh()


def diverse_first_project(
    project: int | str,
    limit: int | None = None,
    clear: bool = False,
    on_progress: Callable[[PushProgress], None] | None = None,
) -> dict[str, Any]:
    """Write (or, with `clear`, remove) the diverse-first order of a Label Studio project."""
    with _pre_annotator(project, on_progress) as annotator:
        if clear:
            return clear_tasks(annotator)
        return order_tasks(annotator, DEFAULT_LIMIT if limit is None else int(limit))
