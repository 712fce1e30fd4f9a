"""Near-duplicates: a constructed duplicate pair is found, clearly different images are not."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from echolabel.cli import main
from tests.helpers import TINY_ENCODER
from workers.evaluation.metrics import leave_one_out_neighbours
from workers.review.duplicates import DEFAULT_THRESHOLD, find_duplicates, groups


def test_constructed_pair_found_and_no_false_pair():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 64))
    x[17] = x[3] + 0.05 * rng.standard_normal(64)  # a re-encoded copy of item 3
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    vectors = x.astype(np.float32)
    others = np.delete(vectors, 17, axis=0) @ np.delete(vectors, 17, axis=0).T
    np.fill_diagonal(others, -1)
    assert others.max() < 0.6  # the rest are clearly different (random directions in 64-d)

    ids = [f"t{i}" for i in range(40)]
    labels = [{"finding": "a"}] * 17 + [{"finding": "b"}] + [{"finding": "a"}] * 22
    result = find_duplicates(vectors, ids, labels, link=lambda t: f"http://ls/{t}")
    assert [(p["a"], p["b"]) for p in result["pairs"]] == [("t3", "t17")]
    pair = result["pairs"][0]
    assert pair["similarity"] > 0.99 and pair["same_labels"] is False  # a label conflict
    assert pair["link_b"] == "http://ls/t17" and result["groups"] == [["t3", "t17"]]
    assert result["threshold"] == DEFAULT_THRESHOLD
    json.dumps(result)  # JSON-able as it is


def test_groups_join_chains_of_frames():
    assert groups([(0, 1, 0.99), (1, 2, 0.98), (5, 6, 0.97)]) == [[0, 1, 2], [5, 6]]


def test_exclusion_removes_near_duplicates_from_neighbours():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, 8))
    x[1] = x[0] + 0.01
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x.astype(np.float32)
    assert leave_one_out_neighbours(x, 1)[0][0, 0] == 1
    indices, sims = leave_one_out_neighbours(x, 9, exclude_above=0.95)
    assert 1 not in indices[0] and 0 not in indices[1] and (sims[sims == sims] < 0.95).all()
    assert indices[0, -1] == -1  # one candidate fewer: padded
    pool = np.zeros(10, dtype=bool)
    pool[[4, 5]] = True
    indices, _ = leave_one_out_neighbours(x, 3, candidates=pool)
    assert set(indices[0, :2]) == {4, 5} and indices[0, 2] == -1 and set(indices[4, :1]) == {5}


def texture(seed: int, size: int = 64) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    return Image.fromarray(pixels).convert("RGB")


def test_duplicates_cli_on_a_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("ECHOLABEL_ENCODER", TINY_ENCODER)
    root = tmp_path / "images"
    root.mkdir()
    lines = ["image,finding"]
    for i in range(12):
        texture(i).save(root / f"img_{i}.png")
        lines.append(f"img_{i}.png,{'a' if i % 2 else 'b'}")
    # The duplicate: image 4 re-encoded as a JPEG and slightly resized.
    buffer = io.BytesIO()
    texture(4).resize((60, 60)).save(buffer, format="JPEG", quality=85)
    (root / "copy_of_4.jpg").write_bytes(buffer.getvalue())
    lines.append("copy_of_4.jpg,b")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")

    out_file = tmp_path / "pairs.json"
    args = ["duplicates", "--images", str(root), "--labels", str(tmp_path / "labels.csv")]
    assert main([*args, "--field", "finding", "--out", str(out_file)]) == 0
    printed = capsys.readouterr().out
    assert "1 near-duplicate pair(s) at cosine ≥ 0.92 among 13 tasks" in printed
    result = json.loads(out_file.read_text())
    assert {result["pairs"][0]["a"], result["pairs"][0]["b"]} == {"img_4.png", "copy_of_4.jpg"}
    pair = result["pairs"][0]
    assert Path(pair["image_a"]).exists() and Path(pair["image_b"]).exists()
    assert pair["similarity"] >= 0.92 and pair["same_labels"] is True
