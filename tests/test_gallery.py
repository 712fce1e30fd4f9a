"""The neighbour gallery on BUSI images (read in place), in JSON and in a real headless
Chromium; its thumbnails (image fetcher rules, bounded disk cache); the link to it that
predictions carry for a label config with <TextArea name="neighbours">."""

from __future__ import annotations

import csv
import dataclasses
import math
import os

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from backend.app import create_app
from backend.thumbnails import ThumbnailCache
from echolabel.core.model import SimilarityModel
from echolabel.embedding import TaskImage
from echolabel.images import ImageFetcher
from echolabel.vote import TEMPERATURE
from tests.browser import chromium_page, needs_chromium
from tests.helpers import SHARED_DATA, TINY_ENCODER, png_bytes, serving
from vectorstore import Point
from workers.runtime import open_runtime

BUSI = SHARED_DATA / "busi"
PROJECT = 4
QUERY = 1
LS_URL = "http://label-studio.example:8080"
CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="finding" toName="image"><Choice value="benign"/><Choice value="malignant"/>
<Choice value="normal"/></Choices>
<TextArea name="neighbours" toName="image" editable="false" readonly="true"
  maxSubmissions="1" rows="1"/>
</View>"""


def needs_busi(test):
    """Real BUSI images, read in place (marked slow like every test on real images)."""
    absent = pytest.mark.skipif(not (BUSI / "labels.csv").exists(), reason=f"{BUSI} is absent")
    return pytest.mark.slow(absent(test))


def busi_rows(every: int = 13) -> list[dict[str, str]]:
    with open(BUSI / "labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))[::every]


@pytest.fixture
def busi_settings(settings):
    return dataclasses.replace(
        settings,
        local_files_root=BUSI,  # read in place, never copied
        encoder=TINY_ENCODER,  # quality does not matter here: the page does
        label_studio_url=LS_URL,
        label_studio_api_key="ls-secret-token-0123456789",
        public_url="http://backend.example:9090",
        max_image_bytes=20 * 1024 * 1024,
        max_image_pixels=50_000_000,
        min_neighbours=3,
        min_score=0.3,
    )


@pytest.fixture
def busi_services(busi_settings):
    """60 BUSI tasks of project 4: task 1 unlabelled (the query), the others labelled."""
    services = open_runtime(busi_settings)
    model = SimilarityModel(services, PROJECT, CONFIG)
    model.setup()  # remembers the label config, as Label Studio's /setup does
    rows = busi_rows()
    items = [
        TaskImage(i, str(BUSI / row["image"]), {} if i == QUERY else {"finding": row["finding"]})
        for i, row in enumerate(rows, 1)
    ]
    assert not model.embed(items).failures
    yield services
    services.close()


@needs_busi
def test_gallery_json_is_the_vote_predict_gives(busi_services, busi_settings):
    app = create_app(busi_settings, busi_services, listen_host="127.0.0.1")
    rows = busi_rows()
    with TestClient(app) as client:
        response = client.get(
            f"/projects/{PROJECT}/tasks/{QUERY}/neighbours", headers={"Accept": "application/json"}
        )
        assert response.status_code == 200, response.text
        gallery = response.json()
        predicted = client.post(
            "/predict",
            json={
                "project": PROJECT,
                "label_config": CONFIG,
                "tasks": [{"id": QUERY, "data": {"image": str(BUSI / rows[0]["image"])}}],
            },
        ).json()["results"][0]

    assert gallery["task"] == QUERY and gallery["labels"] == {}
    neighbours = gallery["neighbours"]
    assert len(neighbours) == busi_settings.top_k == 10
    assert QUERY not in [n["task"] for n in neighbours]
    similarities = [n["similarity"] for n in neighbours]
    assert similarities == sorted(similarities, reverse=True)
    truth = {i: row["finding"] for i, row in enumerate(rows, 1)}
    for n in neighbours:
        assert n["labels"] == {"finding": truth[n["task"]]}
        assert n["label_studio"] == f"{LS_URL}/projects/{PROJECT}/data?task={n['task']}"
        assert n["thumbnail"] == f"/projects/{PROJECT}/tasks/{n['task']}/thumbnail"
    # The weights are the neighbours' weights, exp((s - s_max) / temperature), summed per
    # label: the page shows the vote.
    finding = gallery["vote"]["fields"]["finding"]
    for label, weight in finding["weights"].items():
        expected = sum(
            math.exp((n["similarity"] - similarities[0]) / TEMPERATURE)
            for n in neighbours
            if n["labels"]["finding"] == label
        )
        assert weight == pytest.approx(expected, abs=1e-3)
    # The same vote as /predict (one implementation): label, field score and task score.
    choices = [r for r in predicted["result"] if r["type"] == "choices"]
    assert not finding["abstained"]
    assert choices[0]["value"]["choices"] == [finding["label"]]
    assert choices[0]["score"] == finding["score"]
    assert predicted["score"] == gallery["vote"]["score"]
    # ... and the prediction links the task's gallery for the <TextArea name="neighbours">.
    assert choices, "min_score 0.3: the query's vote is a suggestion here"
    (link,) = [r for r in predicted["result"] if r["type"] == "textarea"]
    assert link == {
        "from_name": "neighbours",
        "to_name": "image",
        "type": "textarea",
        "value": {"text": [f"http://backend.example:9090/projects/{PROJECT}/tasks/1/neighbours"]},
    }


@needs_busi
@needs_chromium
def test_gallery_page_shows_ten_thumbnails_with_labels_in_chromium(
    busi_services, busi_settings, tmp_path
):
    app = create_app(busi_settings, busi_services, listen_host="127.0.0.1")
    shot = tmp_path / "gallery.png"
    with serving(app) as url, chromium_page(1100, 900) as page:
        page.goto(f"{url}/projects/{PROJECT}/tasks/{QUERY}/neighbours")
        page.wait_for_load_state("networkidle")
        loaded = page.eval_on_selector_all(
            ".n img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)"
        )
        query_loaded = page.eval_on_selector(".query img", "i => i.naturalWidth > 0")
        captions = page.eval_on_selector_all(".n figcaption", "fs => fs.map(f => f.innerText)")
        links = page.eval_on_selector_all(
            ".n figcaption a", "links => links.map(a => a.getAttribute('href'))"
        )
        page.screenshot(path=str(shot), full_page=True)
        gallery = httpx.get(
            f"{url}/projects/{PROJECT}/tasks/{QUERY}/neighbours",
            headers={"Accept": "application/json"},
        )
    print("screenshot:", shot)
    assert loaded == [True] * 10 and query_loaded
    neighbours = gallery.json()["neighbours"]
    for caption, neighbour in zip(captions, neighbours, strict=True):
        assert neighbour["labels"]["finding"] in caption
        assert f"similarity {neighbour['similarity']:.3f}" in caption
    assert links == [n["label_studio"] for n in neighbours]
    # Thumbnails were cached on disk under MODEL_DIR (never in the store's payloads).
    cached = list((busi_settings.model_dir / "thumbnails").glob("*.jpg"))
    assert len(cached) == 11


def test_labels_are_escaped_and_unknown_tasks_say_what_to_do(settings):
    settings = dataclasses.replace(
        settings,
        label_studio_url="http://label-studio:8080",  # as the backend reaches it (compose)
        label_studio_public_url="https://ls.example",  # as browsers do
    )
    services = open_runtime(settings)
    try:
        hostile, unicode = "<script>alert(1)</script>", "échographie « 超音波 » &"
        model = SimilarityModel(
            services,
            7,
            '<View><Image name="image" value="$image"/><Choices name="f" toName="image">'
            '<Choice value="a"/></Choices></View>',
        )
        model.setup()
        root = settings.local_files_root
        items = []
        for i in range(4):
            (root / f"{i}.png").write_bytes(png_bytes((40 * i,) * 3, pattern=i + 1))
            labels = {"f": hostile if i % 2 else unicode} if i else {}
            # Folder projects (`echolabel index`) name tasks by their relative path.
            items.append(TaskImage(f"scans/{i}.png", str(root / f"{i}.png"), labels))
        assert not model.embed(items).failures
        with TestClient(create_app(settings, services, listen_host="127.0.0.1")) as client:
            page = client.get("/projects/7/tasks/scans/0.png/neighbours").text
            thumb = client.get("/projects/7/tasks/scans/1.png/thumbnail")
            missing = client.get("/projects/7/tasks/999/neighbours")
            thumb_missing = client.get("/projects/7/tasks/999/thumbnail")
    finally:
        services.close()
    assert hostile not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'src="/projects/7/tasks/scans/1.png/thumbnail"' in page
    assert 'href="https://ls.example/projects/7/data?task=scans%2F1.png"' in page
    assert "label-studio:8080" not in page
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert "échographie « 超音波 » &amp;" in page
    assert missing.status_code == 404 and "Retrieve Predictions" in missing.json()["detail"]
    assert thumb_missing.status_code == 404


def test_thumbnails_go_through_the_image_fetcher_rules(settings):
    """A stored reference to a host that is not allowed (cloud metadata) or a path outside the
    local root is refused by the fetcher, exactly as for /predict."""
    services = open_runtime(settings)
    try:
        store = services.store
        store.ensure_collection(9, TINY_ENCODER, 16, "none")
        vector = np.ones(16, dtype=np.float32) / 4
        store.upsert(
            9,
            TINY_ENCODER,
            [
                Point(1, vector, "http://169.254.169.254/latest/meta-data/"),
                Point(2, vector, "../../etc/passwd"),
            ],
        )
        with TestClient(create_app(settings, services, listen_host="127.0.0.1")) as client:
            metadata = client.get("/projects/9/tasks/1/thumbnail")
            outside = client.get("/projects/9/tasks/2/thumbnail")
    finally:
        services.close()
    assert metadata.status_code == 403 and metadata.json()["error"] == "forbidden"
    assert outside.status_code == 403 and "ECHOLABEL_LOCAL_FILES_ROOT" in outside.json()["detail"]
    assert not list((settings.model_dir / "thumbnails").glob("*.jpg"))


def test_thumbnail_cache_is_bounded_and_evicts_the_least_recently_used(settings, tmp_path):
    root = settings.local_files_root
    rng = np.random.default_rng(0)
    from PIL import Image

    refs = []
    for i in range(12):  # noise does not compress: each thumbnail is several KB
        path = root / f"noise_{i}.png"
        Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(path)
        refs.append(str(path))
    with ImageFetcher(settings) as fetcher:
        unbounded = ThumbnailCache(tmp_path / "probe", fetcher, max_bytes=10**9)
        one = len(unbounded.get(refs[0]))
        cache = ThumbnailCache(tmp_path / "thumbs", fetcher, max_bytes=int(one * 4.5))
        for ref in refs[:4]:
            cache.get(ref)
        cache.get(refs[0])  # used again: the newest now
        os.utime(cache._path(refs[0]), (2e9, 2e9))  # mtimes are coarse on some filesystems
        for ref in refs[4:]:
            cache.get(ref)
            assert cache.size_on_disk() <= one * 4.5 * 1.2
        assert cache._path(refs[0]).exists(), "the recently used thumbnail survived"
        assert not cache._path(refs[1]).exists(), "the least recently used one was evicted"
        assert cache._path(refs[-1]).exists()
        assert cache.get(refs[1]) == unbounded.get(refs[1])  # rebuilt identically on demand


def test_the_gallery_link_needs_the_tag_a_public_url_and_a_suggestion(settings):
    """Only a config with <TextArea name="neighbours"> and ECHOLABEL_PUBLIC_URL get the link,
    and only with a suggestion: Label Studio stores nothing for an empty result and asks again
    later, which an abstained task needs."""
    from echolabel.core.model import Suggestion
    from echolabel.label_config import LabelSchema, parse_label_config
    from echolabel.vote import vote
    from vectorstore import Neighbour

    plain = CONFIG.replace('<TextArea name="neighbours"', '<TextArea name="notes"')
    assert parse_label_config(CONFIG).gallery_link and not parse_label_config(plain).gallery_link
    old = LabelSchema.from_json('{"image_name": "image", "image_key": "image", "fields": []}')
    assert not old.gallery_link  # schemas remembered before this feature
    near = [Neighbour(i, 0.9, {"finding": "benign"}) for i in range(5)]
    sure = Suggestion(vote(near, ["finding"], min_neighbours=3, min_score=0.5), near)
    unsure = Suggestion(vote(near[:2], ["finding"], min_neighbours=3, min_score=0.5), near[:2])
    public = dataclasses.replace(settings, public_url="https://echolabel.example")
    services = open_runtime(public)
    try:

        def kinds(config, suggestion, task="a/b c"):
            model = SimilarityModel(services, 3, config)
            return [r["type"] for r in model.prediction(suggestion, "v", task)["result"]]

        assert kinds(CONFIG, sure) == ["choices", "textarea"]
        assert kinds(plain, sure) == ["choices"]
        assert kinds(CONFIG, unsure) == []
        assert kinds(CONFIG, sure, task=None) == ["choices"]
        model = SimilarityModel(services, 3, CONFIG)
        link = model.prediction(sure, "v", "a/b c")["result"][1]["value"]["text"][0]
        assert link == "https://echolabel.example/projects/3/tasks/a/b%20c/neighbours"
        services.settings = dataclasses.replace(public, public_url=None)
        assert kinds(CONFIG, sure) == ["choices"]
    finally:
        services.close()
