"""`evaluate --learning-curve`: a replayed annotation session, random vs uncertain-first vs
diverse-first."""

from __future__ import annotations

import json

import numpy as np
import pytest

from echolabel.cli import main
from echolabel.diversity import k_center_order
from tests.helpers import TINY_ENCODER, dark_and_bright, overlapping_classes, three_clusters
from workers.evaluation.learning_curve import ORDERS, batch_sizes, learning_curve, replay


def test_batch_sizes_follow_1_2_5_below_the_data():
    assert batch_sizes(780) == [10, 20, 50, 100, 200, 500]
    assert batch_sizes(25) == [10, 20]
    assert batch_sizes(10) == []


def test_replay_reveals_the_sizes_and_measures_the_rest():
    vectors, labels = overlapping_classes(per_class=40)
    sizes = batch_sizes(len(labels))
    points = replay(vectors, {"finding": labels}, order="random", seed=0, sizes=sizes)
    assert [p["labelled"] for p in points] == sizes == [10, 20, 50, 100]
    for p in points:
        f = p["fields"]["finding"]
        assert f["remaining"] == len(labels) - p["labelled"]
        assert 0 <= f["voted"] <= f["remaining"] and f["coverage"] == f["voted"] / f["remaining"]
        assert f["accuracy"] is None or 0.0 <= f["accuracy"] <= 1.0
    # Suggestions get better with more labels on this set (it has structure).
    assert points[-1]["fields"]["finding"]["accuracy"] > 1 / 3 + 0.2

    with pytest.raises(ValueError, match="sizes must increase"):
        replay(vectors, {"finding": labels}, order="random", seed=0, sizes=[50, 20])
    with pytest.raises(ValueError, match="unknown order"):
        replay(vectors, {"finding": labels}, order="alphabetical", seed=0, sizes=sizes)


def test_uncertain_first_differs_from_random_and_seeds_are_summarised():
    vectors, labels = overlapping_classes(per_class=40)
    curve = learning_curve(vectors, {"finding": labels}, seeds=(0, 1, 2))
    assert set(curve["orders"]) == set(ORDERS)
    random_runs, uncertain_runs = curve["runs"]["random"], curve["runs"]["uncertain_first"]
    # Same first batch, different sessions afterwards.
    assert random_runs[0][0] == uncertain_runs[0][0]
    assert random_runs[0][1:] != uncertain_runs[0][1:]
    # Uncertain-first labels the doubtful tasks, so what remains is voted right more often
    # (both orders get nearly every remaining task voted: the nearest neighbours weigh most).
    acc = {o: curve["orders"][o]["finding"]["accuracy_mean"] for o in curve["orders"]}
    assert acc["uncertain_first"][-1] > acc["random"][-1]
    table = curve["orders"]["random"]["finding"]
    assert table["labelled"] == curve["sizes"] and len(table["accuracy_std"]) == len(curve["sizes"])
    first = [run[0]["fields"]["finding"]["accuracy"] for run in random_runs]
    assert table["accuracy_mean"][0] == pytest.approx(np.mean([a for a in first if a is not None]))


def test_diverse_first_follows_the_k_center_order_and_finds_the_rare_classes_sooner():
    """Two rare, distinct classes beside a common one: ten random labels mostly miss them,
    the diverse-first ten cover all three, so the rare tasks get right suggestions at once."""
    vectors, cluster = three_clusters(sizes=(200, 12, 12), spread=0.3)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = {"finding": [("common", "rare-a", "rare-b")[c] for c in cluster]}
    sizes = [10, 20, 50]
    order = k_center_order(vectors)
    points = {}
    for name in ORDERS:
        points[name] = [replay(vectors, labels, order=name, seed=s, sizes=sizes) for s in (0, 1, 2)]
    diverse = points["diverse_first"]
    assert diverse[0] == diverse[1] == diverse[2]  # deterministic: seeds repeat one session
    assert [p["labelled"] for p in diverse[0]] == sizes
    # What it labelled is the order's prefix: the rest is what it measured.
    assert diverse[0][0]["fields"]["finding"]["remaining"] == len(cluster) - 10
    assert sorted(set(cluster[order[:10]])) == [0, 1, 2]

    def accuracy_at_10(name):
        return np.mean([run[0]["fields"]["finding"]["accuracy"] or 0.0 for run in points[name]])

    assert accuracy_at_10("diverse_first") > accuracy_at_10("random")
    assert diverse[0][0]["fields"]["finding"]["accuracy"] > 0.95
    assert diverse[0][0]["fields"]["finding"]["classes_labelled"] == 3


def test_evaluate_cli_learning_curve_and_near_duplicates_in_the_report(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("ECHOLABEL_ENCODER", TINY_ENCODER)
    root = tmp_path / "images"
    root.mkdir()
    paths = dark_and_bright(root, 12)
    (root / "copy.png").write_bytes((root / "dark_0.png").read_bytes())  # an exact duplicate
    lines = ["image,shade"] + [f"{n}.png,{n.split('_')[0]}" for n in paths] + ["copy.png,dark"]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    args = ["evaluate", "--images", str(root), "--labels", str(tmp_path / "labels.csv")]
    code = main(
        [
            *args,
            "--field",
            "shade",
            "--learning-curve",
            "2",
            "--exclude-near-duplicates",
            "--min-class-size",
            "2",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    result = report["encoders"][TINY_ENCODER]
    assert result["near_duplicates_excluded"]["threshold"] == 0.92
    assert result["near_duplicates_excluded"]["pairs"] >= 1
    curve = result["learning_curve"]
    assert curve["sizes"] == [10, 20] and curve["seeds"] == [0, 1]
    assert set(curve["orders"]) == {"random", "uncertain_first", "diverse_first"}
    page = (tmp_path / "out" / "report.html").read_text()
    assert "diverse first: accuracy" in page
    assert "Learning curve" in page and page.count("data:image/png;base64,") == 5
    assert "near-duplicates (cosine ≥ 0.92) excluded" in page


def test_cold_start_script_replays_one_split_and_prints_the_table(tmp_path, monkeypatch, capsys):
    """`python -m bench.cold_start` on a small folder: only the named split's rows are read,
    every order is in the table, and --subsample gives diverse-first a spread."""
    from bench.cold_start import main as cold_start

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    root = tmp_path / "images"
    root.mkdir()
    names = sorted(dark_and_bright(root, 30))
    split = ["test" if i % 6 == 5 else "train" for i in range(len(names))]
    rows = [f"{n}.png,{n.split('_')[0]},{s}" for n, s in zip(names, split, strict=True)]
    (tmp_path / "labels.csv").write_text("image,shade,split\n" + "\n".join(rows) + "\n")
    args = [
        *("--images", str(root), "--labels", str(tmp_path / "labels.csv"), "--field", "shade"),
        *("--split-column", "split", "--encoder", TINY_ENCODER, "--cache", str(tmp_path / "c")),
        *("--sizes", "10,20", "--seeds", "3"),
    ]
    assert cold_start([*args, "--out", str(tmp_path / "curve.json")]) == 0
    out = capsys.readouterr().out
    assert "50 images (split 'train' of" in out and "3 seeds" in out
    assert "| labelled | random: accuracy |" in out and "diverse-first: accuracy" in out
    assert len([line for line in out.splitlines() if line.startswith("| 10 |")]) == 2
    assert "| right: diverse-first − random | ahead in |" in out
    saved = json.loads((tmp_path / "curve.json").read_text())
    diverse = [r for r in saved["rows"] if r["order"] == "diverse_first"]
    assert [r["labelled"] for r in diverse] == [10, 20]
    assert all(r["coverage"]["sd"] == 0 for r in diverse)  # one set: one session
    assert cold_start([*args, "--subsample", "0.8"]) == 0
    assert "each on a random 80% of the rows" in capsys.readouterr().out
