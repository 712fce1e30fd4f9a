"""A labelled folder's fixed split through the product: Label Studio's calls replayed against
the real app (/setup, the TASKS_CREATED webhook of the import, an ANNOTATION_CREATED webhook
for every `train` row, then /predict for the `test` rows), abstentions counted as misses.

    python -m bench.busi_product --images ../shared/data/busi \\
        --labels ../shared/data/busi/labels.csv --field finding --encoder trained:busi-v5

The encoder is any registry name; trained encoders are read from ECHOLABEL_ARTEFACTS_DIR/encoders
(default MODEL_DIR/encoders). The store is a fresh one in a temporary directory, the
vote settings (top-k, minimum neighbours, minimum share) come from the environment as the
backend reads them. A pretrained encoder is centred on the imported images before the
predictions, as the backend's timer does (ECHOLABEL_AUTO_CENTRE=0: not); the retraining loop
stays off, so the encoder named is the one measured. Prints one JSON object: accuracy,
coverage, accuracy where voted, per-class recall, the confusion counts, timings, the machine
and its load average.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from backend.app import create_app
from echolabel.settings import Settings
from echolabel.vote import TEMPERATURE

PROJECT = 1


def label_config(field: str, classes: Sequence[str]) -> str:
    choices = "".join(f'<Choice value="{c}"/>' for c in classes)
    return (
        '<View><Image name="image" value="$image"/>'
        f'<Choices name="{field}" toName="image">{choices}</Choices></View>'
    )


def webhook(task: dict[str, Any], field: str, label: str, annotation: int) -> dict[str, Any]:
    """The body Label Studio 1.23 posts when an annotation is created."""
    return {
        "action": "ANNOTATION_CREATED",
        "project": {"id": PROJECT},
        "task": task,
        "annotation": {
            "id": annotation,
            "task": task["id"],
            "updated_at": "2026-12-01T00:00:00.000000Z",
            "result": [
                {
                    "from_name": field,
                    "to_name": "image",
                    "type": "choices",
                    "value": {"choices": [label]},
                }
            ],
        },
    }


def centre_as_the_backend_does(client: TestClient) -> str | None:
    """Where the backend's timer would centre the project's encoder (within
    ECHOLABEL_RETRAIN_CHECK_S of the import), centre it now and wait; the centred encoder."""
    state = client.app.state.echolabel
    admin = state["admin"]
    if not admin.centring_due(PROJECT):
        return None
    job = admin.local_jobs[admin.start_centring(PROJECT)["job"]]
    while job.status == "started":
        time.sleep(0.2)
    if job.status != "finished":
        raise RuntimeError(f"centring failed: {job.error}")
    return state["runtime"].store.collection(PROJECT).encoder


def evaluate(
    images: Path,
    labels: Path,
    field: str,
    settings: Settings,
    *,
    image_column: str = "image",
    split_column: str = "split",
    batch: int = 32,
) -> dict[str, Any]:
    """Replay the split through the app built from `settings`; the scores."""
    root = images.resolve()
    with open(labels, newline="") as handle:
        rows = list(csv.DictReader(handle))
    train = [(i, r) for i, r in enumerate(rows) if r[split_column] == "train"]
    test = [(i, r) for i, r in enumerate(rows) if r[split_column] == "test"]
    classes = sorted({r[field] for r in rows})
    config = label_config(field, classes)

    def task(i: int, row: dict[str, str]) -> dict[str, Any]:
        return {"id": i, "data": {"image": str(root / row[image_column])}, "project": PROJECT}

    load_before = os.getloadavg()
    started = time.monotonic()
    with TestClient(create_app(settings)) as client:
        project = f"{PROJECT}.1764000000"
        client.post("/setup", json={"project": project, "schema": config}).raise_for_status()
        # The import: Label Studio announces every task, and the backend embeds them in
        # batches ahead of the annotations (which then only set labels).
        imported = {
            "action": "TASKS_CREATED",
            "project": {"id": PROJECT},
            "tasks": [task(i, r) for i, r in [*train, *test]],
        }
        client.post("/webhook", json=imported).raise_for_status()
        for i, row in train:
            body = webhook(task(i, row), field, row[field], 10_000 + i)
            client.post("/webhook", json=body).raise_for_status()
        inbox = client.app.state.echolabel["inbox"]
        if not inbox.wait_idle(timeout=3600) or inbox.failed():
            raise RuntimeError(f"webhooks did not all apply: {inbox.failed()}")
        centred = centre_as_the_backend_does(client)
        learned_s = time.monotonic() - started
        predicted_started = time.monotonic()
        outcome: dict[int, str | None] = {}
        for start in range(0, len(test), batch):
            chunk = test[start : start + batch]
            response = client.post(
                "/predict",
                json={"tasks": [task(i, r) for i, r in chunk], "project": project},
            )
            response.raise_for_status()
            for (i, _), prediction in zip(chunk, response.json()["results"], strict=True):
                chosen = [r for r in prediction["result"] if r["from_name"] == field]
                outcome[i] = chosen[0]["value"]["choices"][0] if chosen else None
        predict_s = time.monotonic() - predicted_started
    truth = {i: r[field] for i, r in test}
    correct = {i: outcome[i] == truth[i] for i in truth}
    voted = [i for i in truth if outcome[i] is not None]
    counts = Counter(truth.values())
    return {
        "encoder": settings.encoder,
        "centred": centred,
        "train_rows": len(train),
        "test_rows": len(test),
        "accuracy": round(sum(correct.values()) / len(test), 4),
        "coverage": round(len(voted) / len(test), 4),
        "voted_accuracy": round(sum(correct[i] for i in voted) / len(voted), 4) if voted else None,
        "recall": {
            cls: f"{sum(correct[i] for i in truth if truth[i] == cls)}/{counts[cls]}"
            for cls in classes
        },
        "confusion": {
            cls: dict(Counter(str(outcome[i]) for i in truth if truth[i] == cls)) for cls in classes
        },
        "vote": {
            "top_k": settings.top_k,
            "min_neighbours": settings.min_neighbours,
            "min_score": settings.min_score,
            "temperature": TEMPERATURE,
        },
        "timing_s": {"learn": round(learned_s, 1), "predict": round(predict_s, 1)},
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "machine": {
            "host": platform.node(),
            "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--field", required=True)
    parser.add_argument("--encoder", help="registry name (default: ECHOLABEL_ENCODER)")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--split-column", default="split")
    args = parser.parse_args(argv)
    configured = Settings.from_env()
    with tempfile.TemporaryDirectory() as scratch:
        settings = dataclasses.replace(
            configured,
            model_dir=Path(scratch),
            artefacts_dir=configured.artefacts,  # where the trained encoders are
            local_files_root=args.images.resolve(),
            encoder=args.encoder or configured.encoder,
            redis_url=None,
            auto_retrain=False,
        )
        result = evaluate(
            args.images,
            args.labels,
            args.field,
            settings,
            image_column=args.image_column,
            split_column=args.split_column,
        )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
