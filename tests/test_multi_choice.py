"""A project with a multi-choice field (labels stored as lists of choices) through every reader
of the stored labels: the gallery shows the lists, near-duplicate pairs compare them, and the
evaluation, Label QA and encoder training, whose methods are single-label, leave the field
out by name (report/refusal) instead of crashing or reading one choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.gallery import build_gallery, render_gallery
from echolabel.core.model import SimilarityModel
from echolabel.embedding import TaskImage
from tests.helpers import TINY_ENCODER, dark_and_bright
from workers import jobs
from workers.evaluation.report import headline, render_html
from workers.runtime import install, open_runtime
from workers.training import TrainingRefused, check_trainable
from workers.training.sources import project_samples

CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="shade" toName="image"><Choice value="dark"/><Choice value="bright"/></Choices>
<Choices name="findings" toName="image" choice="multiple">
<Choice value="mass"/><Choice value="cyst"/><Choice value="shadow"/></Choices></View>"""


@pytest.fixture
def project(settings):
    """18 labelled tasks of project 4 (1-16 and two copies): shade (single) and findings
    (multi); task 99 unlabelled."""
    paths = dark_and_bright(settings.local_files_root, 8)
    services = open_runtime(settings)
    model = SimilarityModel(services, 4, CONFIG)
    model.setup()
    items = [
        TaskImage(
            i,
            path,
            {
                "shade": name.split("_")[0],
                "findings": ["mass", "shadow"] if name.startswith("dark") else ["cyst"],
            },
        )
        for i, (name, path) in enumerate(sorted(paths.items()), 1)
    ]
    # Near-duplicates: dark_0 again, with one choice fewer (a label conflict); dark_1 again,
    # with the same choices; dark_0 again, unlabelled (the gallery's query).
    copies = [
        TaskImage(97, paths["dark_0"], {"shade": "dark", "findings": ["mass"]}),
        TaskImage(98, paths["dark_1"], {"shade": "dark", "findings": ["mass", "shadow"]}),
        TaskImage(99, paths["dark_0"]),
    ]
    assert not model.embed([*items, *copies]).failures
    install(services)
    yield services
    install(None)
    services.close()


def test_gallery_shows_every_choice(project):
    model = SimilarityModel(project, 4)
    gallery = build_gallery(model, 99)
    findings = gallery["vote"]["fields"]["findings"]
    assert findings["choices"] == ["mass", "shadow"] and findings["label"] is None
    assert all(isinstance(n["labels"]["findings"], list) for n in gallery["neighbours"])
    page = render_gallery(gallery)
    assert "<b>mass, shadow</b>" in page and ">mass, shadow</span>" in page


def test_evaluation_and_review_skip_the_multi_choice_field_by_name(project):
    result = jobs.evaluate_project(4)
    report = json.loads(Path(result["report_json"]).read_text())
    encoder = report["encoders"][TINY_ENCODER]
    assert list(encoder["fields"]) == ["shade"]
    assert "multi-choice" in encoder["skipped_fields"]["findings"]
    assert "findings" in result["headline"] and "skipped" in headline(report)
    assert "Field “findings” skipped: multi-choice" in render_html(report)

    review = jobs.review_project(4)
    assert list(review["flagged"]) == ["shade"]
    assert "findings: skipped, multi-choice" in review["headline"]


def test_training_leaves_the_multi_choice_field_out_or_refuses_it_by_name(project):
    samples, fields = project_samples(project.store, 4)
    assert fields == ["shade"]
    assert {tuple(s.labels["findings"]) for s in samples} == {
        ("mass", "shadow"),
        ("mass",),
        ("cyst",),
    }
    with pytest.raises(TrainingRefused, match="refusing to train on findings: multi-choice"):
        check_trainable(samples, ["shade", "findings"], min_per_class=2)


def test_near_duplicate_pairs_compare_the_choice_lists(project):
    pairs = {
        frozenset((p["a"], p["b"])): p
        for p in jobs.find_project_duplicates(4, threshold=0.999)["pairs"]
    }
    dark_0, dark_1 = 9, 10  # sorted names: bright_0..7 are tasks 1-8
    assert not pairs[frozenset((dark_0, 97))]["same_labels"]  # [mass, shadow] vs [mass]
    same = pairs[frozenset((dark_1, 98))]
    assert same["same_labels"] and same["labels_a"]["findings"] == ["mass", "shadow"]


def test_a_project_with_only_multi_choice_fields_is_refused_clearly():
    import numpy as np

    from workers.evaluation.report import evaluate_vectors
    from workers.review.label_issues import review

    vectors = np.eye(4, dtype=np.float32)
    labels = {"findings": [["mass"], ["cyst"], ["mass", "cyst"], None]}
    with pytest.raises(ValueError, match=r"every field \(findings\) is multi-choice"):
        evaluate_vectors(vectors, labels, k=2)
    with pytest.raises(ValueError, match=r"multi-choice, not reviewed: findings"):
        review(vectors, labels, [1, 2, 3, 4], k=2)
    # Training from a project whose only labelled field is multi-choice.

    class Store:
        def collection(self, project):
            return object()

        def iter_points(self, project, labelled, with_vectors):
            from vectorstore import Point

            return [Point(1, vectors[0], "a.png", {"findings": ["mass"]})]

    with pytest.raises(TrainingRefused, match=r"every labelled field \(findings\) is multi"):
        project_samples(Store(), 4)
