"""The near-duplicates page: a project's pairs side by side in a real headless Chromium (both
thumbnails load, a pair labelled two ways is flagged), and as JSON."""

from __future__ import annotations

import csv
import dataclasses

import pytest
from fastapi.testclient import TestClient

from backend.app import create_app
from echolabel.core.model import SimilarityModel
from echolabel.embedding import TaskImage
from tests.browser import chromium_page, needs_chromium
from tests.helpers import SHARED_DATA, TINY_ENCODER, serving
from workers.runtime import open_runtime

BUSI = SHARED_DATA / "busi"
CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="finding" toName="image"><Choice value="benign"/><Choice value="malignant"/>
<Choice value="normal"/></Choices></View>"""

pytestmark = pytest.mark.skipif(not (BUSI / "labels.csv").exists(), reason=f"{BUSI} is absent")


@pytest.fixture
def project_with_a_copy(settings):
    """Twelve BUSI images (read in place) as tasks 1–12, and task 100: task 1's image again,
    labelled differently (the same frame imported twice and annotated two ways)."""
    settings = dataclasses.replace(settings, local_files_root=BUSI, encoder=TINY_ENCODER)
    with open(BUSI / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[::65]
    items = [
        TaskImage(i, str(BUSI / row["image"]), {"finding": row["finding"]})
        for i, row in enumerate(rows, 1)
    ]
    other = next(c for c in ("benign", "malignant", "normal") if c != rows[0]["finding"])
    items.append(TaskImage(100, items[0].image, {"finding": other}))
    services = open_runtime(settings)
    try:
        SimilarityModel(services, 8, CONFIG).setup()
        assert not SimilarityModel(services, 8).embed(items).failures
    finally:
        services.close()
    return settings


# Same bytes give the same vector; 0.999 keeps apart whatever merely looks alike to the tiny
# test encoder (quality is not what this page is about).
THRESHOLD = 0.999


def test_duplicates_as_json_and_refusals(project_with_a_copy):
    app = create_app(project_with_a_copy, listen_host="127.0.0.1")
    with TestClient(app) as client:
        found = client.get(
            f"/projects/8/duplicates?threshold={THRESHOLD}",
            headers={"Accept": "application/json"},
        ).json()
        assert [(p["a"], p["b"], p["same_labels"]) for p in found["pairs"]] == [(1, 100, False)]
        assert found["groups"] == [[1, 100]] and found["tasks"] == 13
        assert client.get("/projects/99/duplicates").status_code == 404
        assert client.get("/projects/8/duplicates?threshold=2").status_code == 422


@needs_chromium
def test_duplicates_side_by_side_in_chromium(project_with_a_copy, tmp_path):
    app = create_app(project_with_a_copy, listen_host="127.0.0.1")
    with serving(app) as url, chromium_page(900, 600) as page:
        page.goto(f"{url}/projects/8/duplicates?threshold={THRESHOLD}")
        page.wait_for_load_state("networkidle")
        widths = page.eval_on_selector_all(".pair img", "imgs => imgs.map(i => i.naturalWidth)")
        text = page.inner_text("body")
        page.screenshot(path=str(tmp_path / "duplicates.png"))
    assert len(widths) == 2 and all(w > 0 for w in widths), widths
    assert "1 pair(s) at cosine ≥ 0.999 among 13 tasks" in text and "labels conflict" in text
