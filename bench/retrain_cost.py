"""The cost of one automatic retraining round, per 1,000 labelled images.

    python -m bench.retrain_cost --images ../shared/data/busi \\
        --labels ../shared/data/busi/labels.csv --field finding --where split=train

Indexes the labelled rows (default: BUSI's `train` rows; test rows are never read) into a
scratch project with the pretrained encoder, as a project whose annotators labelled them would
be, then times `run_round` exactly as the `retrain` job calls it (the settings' policy and
`TrainOptions`, `ECHOLABEL_RETRAIN_OPTIONS` included): training the challenger, then scoring
it (embedding the labelled images with it and voting the held-out ones). The promotion's
zero-downtime re-embedding of the whole project is a job of its own and is not counted: the
issue's target is "one round, re-embedding excluded". The indexing beforehand is not timed.

Prints one JSON object: the round's seconds (train, score, total), minutes per 1,000
labelled images, the process's CPU seconds in the round, the decision, the machine, the load
average before and after, and the date. Times on the shared 2-core machine move 2x with other
people's work: read the load averages with them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import machine
from echolabel.core.model import SimilarityModel
from echolabel.embedding import TaskImage
from echolabel.folders import read_folder
from echolabel.settings import Settings
from workers.runtime import open_runtime
from workers.training import TrainOptions
from workers.training.retraining import run_round
from workers.training.selection import RetrainPolicy, SelectionLog

PROJECT = 1


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def label_config(fields: dict[str, list[str]]) -> str:
    """A Label Studio config with one single-choice field per labelled column."""
    choices = "".join(
        f'<Choices name="{name}" toName="image">'
        + "".join(f'<Choice value="{value}"/>' for value in values)
        + "</Choices>"
        for name, values in fields.items()
    )
    return f'<View><Image name="image" value="$image"/>{choices}</View>'


def measure(
    images: Path,
    labels: Path,
    fields: list[str],
    where: dict[str, str],
    limit: int | None,
    base: Settings,
) -> dict[str, Any]:
    items = read_folder(images, labels, fields=tuple(fields), where=where)
    if limit and limit < len(items):
        # Evenly spaced rows keep each class's share in a CSV sorted by class.
        items = [items[int(i * len(items) / limit)] for i in range(limit)]
    classes = {f: sorted({str(i.labels[f]) for i in items if i.labels.get(f)}) for f in fields}
    with tempfile.TemporaryDirectory(prefix="echolabel-retrain-cost-") as scratch:
        settings = dataclasses.replace(
            base,
            model_dir=Path(scratch),
            artefacts_dir=Path(scratch) / "artefacts",
            local_files_root=images.resolve(),
            redis_url=None,  # inline: the round itself is what is timed, not a queue
            qdrant_url=None,
        )
        runtime = open_runtime(settings)
        try:
            clock = time.monotonic()
            report = SimilarityModel(runtime, PROJECT, label_config(classes)).embed(
                [
                    TaskImage(n, str(item.path), {f: str(item.labels[f]) for f in fields})
                    for n, item in enumerate(items)
                ]
            )
            index_s = time.monotonic() - clock
            labelled = runtime.store.count(PROJECT, labelled=True)
            # The options the `retrain` job passes (workers/jobs.py), vote settings included.
            options = TrainOptions.for_retraining(settings)
            load_before = os.getloadavg()
            cpu_before = _cpu_seconds()
            clock = time.monotonic()
            candidate = run_round(
                store=runtime.store,
                embedder=runtime.embedder,
                fetcher=runtime.fetcher,
                encoders_dir=settings.encoders_dir,
                selection=SelectionLog(settings.selection_dir),
                project=PROJECT,
                policy=RetrainPolicy.from_settings(settings),
                options=options,
                patient_key=settings.patient_key,
            )
            round_s = time.monotonic() - clock
            cpu_s = _cpu_seconds() - cpu_before
            load_after = os.getloadavg()
        finally:
            runtime.close()
    if candidate.train_seconds is None:
        raise RuntimeError(f"the round did not train: {candidate.decision}: {candidate.reason}")
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "labelled": labelled,
        "index_failures": len(report.failures),
        "encoder": settings.encoder,
        "options": dataclasses.asdict(options),
        "decision": candidate.decision,
        "reason": candidate.reason,
        "trained_on": candidate.details.get("trained_on"),
        "index_s (not counted)": round(index_s, 1),
        "train_s": candidate.train_seconds,
        "score_s": candidate.score_seconds,
        "round_s": round(round_s, 1),
        "round_min_per_1000_labelled": round(round_s / 60 / labelled * 1000, 2),
        # This process's CPU time (user + system) in the round: on a shared machine it moves
        # far less with other people's work than the wall time does.
        "round_cpu_s": round(cpu_s, 1),
        "round_cpu_min_per_1000_labelled": round(cpu_s / 60 / labelled * 1000, 2),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--field", action="append", required=True)
    parser.add_argument(
        "--where",
        action="append",
        metavar="COLUMN=VALUE",
        help="only these CSV rows (repeatable; default split=train: test rows stay unread)",
    )
    parser.add_argument("--limit", type=int, help="only N rows, evenly spaced")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    where = dict(spec.split("=", 1) for spec in args.where or ["split=train"])
    result = measure(args.images, args.labels, args.field, where, args.limit, Settings.from_env())
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
