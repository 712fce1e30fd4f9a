"""Review in the browser, on a real Label Studio 1.23.2 set up by `echolabel demo` (BUSI
subset, half annotated), in Debian's headless Chromium:

- the labelling screen shows the link to the task's neighbour gallery (the prediction's
  read-only <TextArea name="neighbours">), and that link opens the gallery with ten thumbnails;
- after choosing our predictions for prelabelling (Settings → Annotation), the Data Manager
  ordered by prediction score lists the least certain tasks first;
- after `POST /projects/<p>/diverse-first`, the Data Manager ordered by the task data column
  `echolabel_diverse_first` lists the diverse-first order, and with every task ticked,
  "Label N Tasks" opens its first task.

Screenshots go to a temp folder; with ECHOLABEL_UPDATE_SCREENSHOTS=1 to docs/screenshots/
(each at most 200 KB).
"""

from __future__ import annotations

import re

import httpx
import pytest

from echolabel.core.diverse_first import FIELD
from echolabel.demo import USER, _job_done, _learned
from echolabel.labelstudio import LabelStudioClient
from echolabel.settings import Settings
from tests.browser import (
    chromium_page,
    log_in_to_label_studio,
    needs_chromium,
    screenshot_folder,
    shoot,
)
from tests.helpers import SHARED_DATA, busi_demo, choices_result

BUSI = SHARED_DATA / "busi"
MAX_BYTES = 200_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.labelstudio,
    pytest.mark.skipif(not (BUSI / "labels.csv").exists(), reason=f"{BUSI} is not present"),
    needs_chromium,
]


def test_gallery_link_and_uncertain_first_in_label_studio(tmp_path):
    out = screenshot_folder(tmp_path)
    folder = tmp_path / "busi-subset"
    with busi_demo(folder) as demo:
        client = LabelStudioClient(
            Settings(label_studio_url=demo.label_studio.url, label_studio_api_key=demo.token)
        )
        tasks = list(client.tasks(demo.project, full=True))
        predicted = {t["id"]: t["predictions"][0] for t in tasks if t["predictions"]}
        (version,) = {p["model_version"] for p in predicted.values()}
        task = min(predicted, key=lambda t: (predicted[t]["score"], t))  # the least certain
        link = f"{demo.backend_url}/projects/{demo.project}/tasks/{task}/neighbours"
        base = demo.label_studio.url
        with chromium_page(1200, 900) as page:
            log_in_to_label_studio(page, base, USER, demo.password)

            # 1. The labelling screen shows the gallery link of the task.
            page.goto(f"{base}/projects/{demo.project}/data?task={task}")
            shown = page.locator("[data-testid=htx-textbox-content]").filter(has_text=link)
            shown.wait_for()
            page.wait_for_load_state("networkidle")
            page.wait_for_timeout(1000)  # the editor re-renders once its task is loaded
            shown.evaluate("e => e.scrollIntoView({block: 'center'})")
            link_boxes = shown.count()
            shoot(page, out / "task-gallery-link.jpg")

            # 2. The link opens the gallery: ten labelled neighbours with thumbnails.
            page.goto(link)
            page.wait_for_load_state("networkidle")
            thumbnails = page.eval_on_selector_all(
                ".n img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)"
            )
            captions = page.eval_on_selector_all(".n figcaption", "fs => fs.map(f => f.innerText)")
            shoot(page, out / "gallery.jpg", full_page=True)

            # 3. Settings → Annotation → prelabel with our predictions' version → Save.
            page.goto(f"{base}/projects/{demo.project}/settings/annotation")
            page.get_by_text("echolabel (Connected)").click()
            page.locator(f'[data-testid="select-option-{version}"]').click()
            with page.expect_response(
                lambda r: f"/api/projects/{demo.project}" in r.url and r.request.method == "PATCH"
            ):
                page.get_by_role("button", name="Save").click()
            chosen = client.project(demo.project).get("model_version")

            # 4. Data Manager: Columns → Prediction score; Order by → Prediction score.
            page.goto(demo.url)
            page.wait_for_load_state("networkidle")
            page.get_by_role("button", name="Columns").click()
            page.get_by_text("Prediction score", exact=True).last.click()
            page.mouse.click(700, 24)
            page.get_by_text("Order by", exact=True).click()
            page.get_by_text("Prediction score", exact=True).last.click()
            page.mouse.click(700, 24)  # the empty middle of the top bar closes the menu
            page.wait_for_load_state("networkidle")
            ordering = _ordering(base, demo.token, demo.project)
            if ordering and ordering[0].startswith("-"):  # the arrow next to it: ascending
                page.locator("text=Order by >> xpath=../..//button").last.click()
                page.wait_for_load_state("networkidle")
                ordering = _ordering(base, demo.token, demo.project)
            page.wait_for_timeout(1000)
            rows = page.eval_on_selector_all(
                "[class*=row-wrapper]", "rows => rows.map(r => r.innerText.split('\\n')[0])"
            )
            shoot(page, out / "data-manager-by-score.jpg")
        order = _view_order(base, demo.token, demo.project)
        # 5. A later push (after a new annotation) moves the project to its new version itself,
        # so the order by score stays meaningful without clicking again.
        client.annotate(task, choices_result({"finding": "benign"}))
        _learned(demo.backend_url)
        httpx.post(f"{demo.backend_url}/projects/{demo.project}/preannotate", timeout=30)
        _job_done(demo.backend_url, f"preannotate-{demo.project}")
        later = {
            p["model_version"]
            for t in client.tasks(demo.project, full=True)
            for p in t["predictions"]
        }
        followed = client.project(demo.project).get("model_version")
        client.close()

    assert link_boxes == 1
    assert thumbnails == [True] * 10, thumbnails
    assert all(re.search(r"finding (benign|malignant|normal)", c) for c in captions), captions
    assert chosen == version, "the project now shows (and scores) our pushed predictions"
    assert ordering == ["tasks:predictions_score"], ordering
    shown_rows = [int(r) for r in rows if r.isdigit()]
    assert shown_rows and shown_rows == order[: len(shown_rows)], (shown_rows, order)
    first = order[: len(predicted)]
    assert sorted(first) == sorted(predicted), (order, sorted(predicted))
    scores = [predicted[t]["score"] for t in first]
    assert scores == sorted(scores) and first[0] == task, list(zip(first, scores, strict=True))
    assert len(later) == 1 and later != {version} and followed in later, (later, followed)
    for shot in out.glob("*.jpg"):
        assert shot.stat().st_size <= MAX_BYTES, shot


def test_diverse_first_order_in_label_studio(tmp_path):
    out = screenshot_folder(tmp_path)
    folder = tmp_path / "busi-subset"
    with busi_demo(folder) as demo:
        client = LabelStudioClient(
            Settings(label_studio_url=demo.label_studio.url, label_studio_api_key=demo.token)
        )
        before = {t["id"]: t["data"] for t in client.tasks(demo.project, resolve_uri=False)}
        # 1. The job: the backend embeds what it lacks, orders, writes data.echolabel_diverse_first.
        url = f"{demo.backend_url}/projects/{demo.project}/diverse-first"
        started = httpx.post(url, timeout=30)
        job = _job_done(demo.backend_url, f"diverse-first-{demo.project}")
        tasks = list(client.tasks(demo.project, full=True, resolve_uri=False))
        base = demo.label_studio.url
        with chromium_page(1200, 900) as page:
            log_in_to_label_studio(page, base, USER, demo.password)
            # 2. Data Manager: Order by → echolabel_diverse_first (the arrow: ascending).
            page.goto(demo.url)
            page.wait_for_load_state("networkidle")
            page.get_by_text("Order by", exact=True).click()
            page.get_by_text(FIELD, exact=True).last.click()
            page.mouse.click(700, 24)  # the empty middle of the top bar closes the menu
            page.wait_for_load_state("networkidle")
            ordering = _ordering(base, demo.token, demo.project)
            if ordering and ordering[0].startswith("-"):
                page.locator("text=Order by >> xpath=../..//button").last.click()
                page.wait_for_load_state("networkidle")
                ordering = _ordering(base, demo.token, demo.project)
            page.wait_for_timeout(1000)
            rows = page.eval_on_selector_all(
                "[class*=row-wrapper]", "rows => rows.map(r => r.innerText.split('\\n'))"
            )
            shoot(page, out / "data-manager-diverse-first.jpg")
            # 3. Tick the header box (every task), "Label N Tasks": the labelling stream then
            # follows the tab's order. ("Label All Tasks" with nothing ticked does not: Label
            # Studio 1.23.2 sends no ordering then and serves tasks by id.)
            page.locator("input[type=checkbox]").first.click()
            with page.expect_response(lambda r: "id=next_task" in r.url) as nxt:
                page.get_by_role("button", name=re.compile(r"^Label \d+ Tasks?$")).click()
            opened = nxt.value.json()
        order = _view_order(base, demo.token, demo.project)
        client.close()

    assert started.status_code == 200, started.text
    result = job["result"]
    unlabelled = sorted(t["id"] for t in tasks if not t["annotations"])
    ranked = {t["id"]: t["data"][FIELD] for t in tasks if FIELD in t["data"]}
    assert sorted(ranked) == unlabelled and result["ranked"] == len(unlabelled)
    assert sorted(ranked.values()) == [f"{i:04d}" for i in range(1, len(unlabelled) + 1)]
    by_rank = sorted(ranked, key=ranked.__getitem__)
    assert by_rank[: len(result["first"])] == result["first"]
    # Nothing but the one key changed in any task's data.
    for t in tasks:
        assert {k: v for k, v in t["data"].items() if k != FIELD} == before[t["id"]]
    assert ordering == [f"tasks:data.{FIELD}"], ordering
    assert order[: len(by_rank)] == by_rank, (order, by_rank)  # labelled tasks (no key) last
    shown_rows = [int(r[0]) for r in rows if r[0].isdigit()]
    assert shown_rows and shown_rows == order[: len(shown_rows)], (shown_rows, order)
    assert "0001" in rows[0] and "0002" in rows[1], rows[:2]  # the column shows the places
    assert opened["id"] == by_rank[0], (opened.get("queue"), ranked.get(opened["id"]))
    assert opened["queue"] == "Data manager queue", opened["queue"]
    for shot in out.glob("*.jpg"):
        assert shot.stat().st_size <= MAX_BYTES, shot


def _ordering(base: str, token: str, project: int) -> list[str]:
    views = httpx.get(
        f"{base}/api/dm/views/",
        params={"project": project},
        headers={"Authorization": f"Token {token}"},
        timeout=30,
    ).json()
    return list(views[0]["data"].get("ordering") or [])


def _view_order(base: str, token: str, project: int) -> list[int]:
    """Task ids in the order of the Data Manager's tab (what its table lists)."""
    headers = {"Authorization": f"Token {token}"}
    view = httpx.get(
        f"{base}/api/dm/views/", params={"project": project}, headers=headers, timeout=30
    ).json()[0]
    body = httpx.get(
        f"{base}/api/tasks/",
        params={"project": project, "view": view["id"], "page_size": 1000},
        headers=headers,
        timeout=30,
    ).json()
    return [t["id"] for t in body["tasks"]]
