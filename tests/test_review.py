"""Label QA: cleanlab on the neighbours' leave-one-out vote finds flipped labels."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np

from backend.admin import Admin
from echolabel.cli import main
from echolabel.core.model import SimilarityModel
from echolabel.embedding import TaskImage
from tests.helpers import TINY_ENCODER, dark_and_bright, overlapping_classes
from tests.label_configs import SHADE_CONFIG
from workers.evaluation.metrics import leave_one_out_neighbours
from workers.review.flip_bench import flip_labels, precision_recall_at
from workers.review.label_issues import CSV_COLUMNS, rank_label_issues
from workers.runtime import install, open_runtime


def test_flagged_labels_are_mostly_the_flipped_ones():
    vectors, labels = overlapping_classes()
    nearest = leave_one_out_neighbours(vectors, 1)[0][:, 0]
    assert 0.7 < np.mean([labels[i] == labels[j] for i, j in enumerate(nearest)]) < 0.9
    noisy, flipped = flip_labels(labels, 0.10, np.random.default_rng(1))
    rate = flipped.mean()  # the precision a random ranking has in expectation
    n = int(flipped.sum())
    assert n == 30 and sum(a != b for a, b in zip(labels, noisy, strict=True)) == n

    ranked = rank_label_issues(vectors, noisy, field="class", k=10)
    ranking = [row["index"] for row in ranked["rows"]]
    precision, recall = precision_recall_at(ranking, flipped, n)
    random_precision, _ = precision_recall_at(
        list(np.random.default_rng(2).permutation(len(noisy))), flipped, n
    )
    print(f"flip rate {rate:.3f}: P@{n} {precision:.2f}, random ranking {random_precision:.2f}")
    assert recall == precision  # N = the number flipped
    assert precision >= 4 * rate and precision >= random_precision + 0.4
    # cleanlab's own verdicts: most flagged labels are flipped ones.
    flags = np.array([row["index"] for row in ranked["rows"] if row["flagged"]])
    assert len(flags) == ranked["flagged"] > 0
    assert flipped[flags].mean() >= 3 * rate

    # Rows are complete and ranked worst first by cleanlab's label quality score.
    assert [row["rank"] for row in ranked["rows"]] == list(range(1, len(noisy) + 1))
    scores = [row["label_score"] for row in ranked["rows"]]
    assert scores == sorted(scores)
    top = ranked["rows"][0]
    assert top["vote"] != top["label"] and top["support"] == 10 and top["vote_score"] > 0.5


def test_unlabelled_items_neither_vote_nor_get_ranked():
    vectors, labels = overlapping_classes(per_class=20)
    partial = [None if i % 4 == 0 else label for i, label in enumerate(labels)]
    ranked = rank_label_issues(vectors, partial)
    assert ranked["labelled"] == len(ranked["rows"]) == 45
    assert all(partial[row["index"]] is not None for row in ranked["rows"])
    assert all(row["support"] == 10 for row in ranked["rows"])


def shaded_folder(tmp_path: Path, count: int, swapped: tuple[str, ...]) -> Path:
    """Dark and bright images labelled by shade in labels.csv, except `swapped` ones."""
    root = tmp_path / "images"
    root.mkdir()
    paths = dark_and_bright(root, count)
    lines = ["image,shade"]
    for name in paths:
        shade = name.split("_")[0]
        if name in swapped:
            shade = "bright" if shade == "dark" else "dark"
        lines.append(f"{name}.png,{shade}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_review_cli_on_a_folder_writes_csv_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("ECHOLABEL_ENCODER", TINY_ENCODER)
    root = shaded_folder(tmp_path, 10, swapped=("dark_3", "bright_6"))
    args = ["review", "--images", str(root), "--labels", str(tmp_path / "labels.csv")]
    assert main([*args, "--field", "shade", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert "shade: 2 of 20 labels flagged" in out.out and "review.csv" in out.err

    with open(tmp_path / "out" / "review.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 20
    assert {rows[0]["task"], rows[1]["task"]} == {"dark_3.png", "bright_6.png"}
    assert [r["flagged"] for r in rows[:3]] == ["True", "True", "False"]
    assert rows[0]["vote"] != rows[0]["label"] and rows[0]["link"] == ""
    result = json.loads((tmp_path / "out" / "review.json").read_text())
    assert result["fields"]["shade"]["flagged"] == 2 and result["method"] == "self_confidence"

    assert main(["review", "--images", str(root)]) == 1
    assert "review needs --images, --labels, --field and --out" in capsys.readouterr().err


def test_review_of_a_project_from_the_admin_and_the_cli(settings, monkeypatch, capsys):
    import dataclasses

    settings = dataclasses.replace(settings, label_studio_url="http://ls.example:8080")
    paths = dark_and_bright(settings.local_files_root, 8)
    wrong = {"dark_2"}
    services = open_runtime(settings)
    config = SHADE_CONFIG
    tasks = {name: 100 + i for i, name in enumerate(paths)}
    SimilarityModel(services, 4, config).embed(
        [
            TaskImage(
                tasks[n],
                p,
                {"shade": ("bright" if n in wrong else n.split("_")[0])},
            )
            for n, p in paths.items()
        ]
    )
    admin = Admin(services)
    install(services)  # as the backend does: jobs share its store
    try:
        started = admin.start_review(4)
        assert started == {"job": "review-4", "status": "started", "queue": "in-process"}
        deadline = time.monotonic() + 30
        while admin.local_jobs["review-4"].status == "started" and time.monotonic() < deadline:
            time.sleep(0.05)
        job = admin.local_jobs["review-4"]
        assert job.status == "finished", job.error
    finally:
        install(None)
        services.close()
    review = json.loads(Path(job.result["review_json"]).read_text())
    top = review["fields"]["shade"]["rows"][0]
    assert top["task"] == tasks["dark_2"] and top["label"] == "bright" and top["vote"] == "dark"
    assert top["link"] == f"http://ls.example:8080/projects/4/data?task={tasks['dark_2']}"
    assert job.result["flagged"] == {"shade": 1}
    assert (
        Path(job.result["review_csv"]).parent
        == settings.model_dir / "reviews" / "4" / Path(job.result["review_csv"]).parent.name
    )

    # The CLI runs the same job here when there is no REDIS_URL.
    monkeypatch.setenv("MODEL_DIR", str(settings.model_dir))
    monkeypatch.setenv("ECHOLABEL_ENCODER", TINY_ENCODER)
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://ls.example:8080")
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert main(["review", "--project", "4"]) == 0
    out = capsys.readouterr()
    assert "shade: 1 of 16 labels flagged" in out.out and "review.json" in out.err
    assert main(["review", "--project", "5"]) == 1
    assert "project 5 has no collection" in capsys.readouterr().err


def test_review_runs_as_an_rq_job_on_the_evaluate_queue(settings, redis_db):
    import dataclasses

    from rq.job import Job

    from tests.helpers import REDIS_URL, run_worker
    from workers import jobs
    from workers.queues import EVALUATE, enqueue_unique, queue

    paths = dark_and_bright(settings.local_files_root, 6)
    services = open_runtime(settings)
    config = SHADE_CONFIG
    SimilarityModel(services, 9, config).embed(
        [
            TaskImage(n, p, {"shade": "dark" if n == "bright_1" else n.split("_")[0]})
            for n, p in paths.items()
        ]
    )
    services.close()  # the worker process opens the embedded store itself
    job = enqueue_unique(queue(redis_db, EVALUATE), "review-9", jobs.review_project, 9)
    run_worker(dataclasses.replace(settings, redis_url=REDIS_URL), EVALUATE)
    done = Job.fetch(job.id, connection=redis_db)
    assert done.get_status() == "finished", done.latest_result()
    result = done.return_value()
    assert result["flagged"] == {"shade": 1}
    top = json.loads(Path(result["review_json"]).read_text())["fields"]["shade"]["rows"][0]
    assert top["task"] == "bright_1" and top["link"] is None  # no LABEL_STUDIO_URL
