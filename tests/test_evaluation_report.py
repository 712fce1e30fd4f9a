"""`echolabel evaluate`: report.json's contract and a self-contained report.html."""

from __future__ import annotations

import json
import re

from echolabel.cli import main
from tests.browser import chromium_page, needs_chromium
from tests.helpers import TINY_ENCODER, TINY_ENCODER_B, dark_and_bright
from tests.label_configs import SHADE_CONFIG
from workers.runtime import open_runtime


def shaded_folder(tmp_path, count):
    """`count` dark and bright images under tmp_path/images, labelled in tmp_path/labels.csv."""
    root = tmp_path / "images"
    root.mkdir()
    paths = dark_and_bright(root, count)
    lines = ["image,shade"] + [f"{n}.png,{n.split('_')[0]}" for n in paths]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_evaluate_folder_writes_the_contract_and_the_page(tmp_path, monkeypatch, capsys):
    root = tmp_path / "images"
    root.mkdir()
    paths = dark_and_bright(root, 12)
    lines = ["image,shade,patient"]
    for name in paths:
        lines.append(f"{name}.png,{name.split('_')[0]},p{int(name.split('_')[1]) // 2}")
    (root / "broken.png").write_bytes(b"not an image")
    lines.append("broken.png,dark,p99")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))

    code = main(
        [
            "evaluate",
            "--images",
            str(root),
            "--labels",
            str(tmp_path / "labels.csv"),
            "--field",
            "shade",
            "--patient-column",
            "patient",
            "--encoders",
            f"{TINY_ENCODER},{TINY_ENCODER_B}",
            "--choose-k",
            "1,3,5",
            "--min-class-size",
            "5",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "shade" in out.out and TINY_ENCODER_B in out.out  # the headline table

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["dataset"]["items"] == 25 and report["dataset"]["groups"] is True
    assert len(report["dataset"]["fingerprint"]) == 16 and "evaluate" in report["command"]
    for name in (TINY_ENCODER, TINY_ENCODER_B):
        block = report["encoders"][name]
        assert block["images"] == 24 and list(block["failed"]) == ["broken.png"]
        shade = block["fields"]["shade"]
        for cls in ("dark", "bright"):
            stats = shade["classes"][cls]
            assert stats["count"] == 12
            assert set(stats["precision_at_k"]) == {"1", "3", "5", "10"}
            # 12 of 24 labelled: the papers' random expectation is 12/24 × 10.
            assert stats["random_expectation"] == 5.0
        assert shade["weighted_same_in_top10"] > shade["weighted_random_expectation"]
        assert set(shade["precision_at_k"]) == {"micro", "macro"}
        assert shade["vote"]["accuracy"] == 1.0 and shade["vote"]["macro_f1"] == 1.0
        assert shade["vote"]["choose_k"]["best_k"] in (1, 3, 5)
        # Patients known: `fields` is the leave-patient-out view, both are kept.
        assert shade == block["leave_patient_out"]["shade"]
        assert "leave_one_out" in block
        pixels = block["pixels"]["leave_patient_out"]  # same shade retrieved: closer pixels
        assert pixels["retrieved"]["mse"] < pixels["random"]["mse"]

    page = (tmp_path / "out" / "report.html").read_text()
    assert len(re.findall(r"<img alt='[^']+' src='data:image/png;base64,", page)) == 4
    assert "Confusion of the vote" in page and "Pixel similarity" in page
    assert "best k on a validation split" in page
    assert "http" not in page  # offline: nothing to fetch


@needs_chromium
def test_report_renders_in_a_real_browser(tmp_path, monkeypatch):
    """Headless Debian Chromium opens report.html: tables and every plot are drawn."""
    root = shaded_folder(tmp_path, 10)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    assert (
        main(
            [
                "evaluate",
                "--images",
                str(root),
                "--labels",
                str(tmp_path / "labels.csv"),
                "--field",
                "shade",
                "--encoders",
                TINY_ENCODER,
                "--min-class-size",
                "5",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    shot = tmp_path / "out" / "report.png"
    with chromium_page(1200, 900) as page:
        page.goto((tmp_path / "out" / "report.html").as_uri())
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
        heading = page.inner_text("h1")
        page.screenshot(path=str(shot), full_page=True)
    assert heading == "echolabel evaluation"
    assert len(widths) == 4 and all(w > 100 for w in widths)  # every plot decoded
    assert shot.stat().st_size > 20_000


def test_admin_evaluates_a_project_from_the_store(settings):
    import time
    from pathlib import Path

    from fastapi.testclient import TestClient

    from backend.app import create_app
    from echolabel.core.model import SimilarityModel
    from echolabel.embedding import TaskImage

    paths = dark_and_bright(settings.local_files_root, 8)
    services = open_runtime(settings)
    config = SHADE_CONFIG
    SimilarityModel(services, 4, config).embed(
        [TaskImage(n, p, {"shade": n.split("_")[0]}) for n, p in paths.items()]
    )
    services.close()
    with TestClient(create_app(settings)) as client:
        started = client.post("/projects/4/evaluate").json()
        assert started["job"] == "evaluate-4"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            job = next(j for j in client.get("/jobs").json()["jobs"] if j["id"] == "evaluate-4")
            if job["status"] != "started":
                break
            time.sleep(0.1)
    assert job["status"] == "finished", job
    report = json.loads(Path(job["result"]["report_json"]).read_text())
    shade = report["encoders"][TINY_ENCODER]["fields"]["shade"]
    assert shade["classes"]["dark"]["count"] == 8 and shade["vote"]["accuracy"] == 1.0
    assert Path(job["result"]["report_html"]).exists() and "shade" in job["result"]["headline"]


def test_group_map_adds_a_group_field_and_project_mode_reads_the_store(
    tmp_path, monkeypatch, capsys
):
    root = shaded_folder(tmp_path, 6)
    (tmp_path / "groups.csv").write_text("dark,any\nbright,any\n")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("ECHOLABEL_ENCODER", TINY_ENCODER)
    assert (
        main(
            [
                "evaluate",
                "--images",
                str(root),
                "--labels",
                str(tmp_path / "labels.csv"),
                "--field",
                "shade",
                "--group-map",
                f"shade={tmp_path / 'groups.csv'}",
                "--min-class-size",
                "2",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    group = report["encoders"][TINY_ENCODER]["fields"]["shade_group"]
    assert group["classes"]["any"]["count"] == 12 and group["weighted_same_in_top10"] == 10.0

    assert main(["evaluate", "--project", "none"]) == 1
    assert "no collection" in capsys.readouterr().err
    assert (
        main(
            [
                "index",
                str(root),
                "--labels",
                str(tmp_path / "labels.csv"),
                "--field",
                "shade",
                "--project",
                "p1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["evaluate", "--project", "p1", "--min-class-size", "2"]) == 0
    out = capsys.readouterr()
    assert "shade" in out.out and "report.html" in out.err
