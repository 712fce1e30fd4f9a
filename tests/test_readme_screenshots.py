"""The README's screenshots, taken from a real Label Studio set up by `echolabel demo`, in
Debian's headless Chromium; each page is checked for what it must show.

Written to a temp folder; with ECHOLABEL_UPDATE_SCREENSHOTS=1 to docs/screenshots/ (committed,
each at most 200 KB).
"""

from __future__ import annotations

import re

import pytest

from echolabel.demo import USER
from echolabel.labelstudio import LabelStudioClient
from echolabel.settings import Settings
from tests.browser import (
    chromium_page,
    log_in_to_label_studio,
    needs_chromium,
    screenshot_folder,
    shoot,
)
from tests.helpers import SHARED_DATA, busi_demo

BUSI = SHARED_DATA / "busi"
MAX_BYTES = 200_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.labelstudio,
    pytest.mark.skipif(not (BUSI / "labels.csv").exists(), reason=f"{BUSI} is not present"),
    needs_chromium,
]


def test_readme_screenshots_show_our_suggestions_in_label_studio(tmp_path):
    out = screenshot_folder(tmp_path)
    folder = tmp_path / "busi-subset"
    with busi_demo(folder) as demo:
        client = LabelStudioClient(
            Settings(label_studio_url=demo.label_studio.url, label_studio_api_key=demo.token)
        )
        tasks = list(client.tasks(demo.project, full=True))
        client.close()
        task = next(t for t in tasks if t["predictions"] and not t["annotations"])
        (prediction,) = task["predictions"]
        (choice,) = [r for r in prediction["result"] if r["type"] == "choices"]
        label = choice["value"]["choices"][0]
        base = demo.label_studio.url
        predicted = sum(1 for t in tasks if t["predictions"])
        score = f"{round(prediction['score'] * 100, 2):g}%"  # how the prediction's tab shows it
        with chromium_page(1200, 760) as page:
            log_in_to_label_studio(page, base, USER, demo.password)

            # The demo's first screen after login: its project with the counts loaded
            # (annotated / tasks on the card; the card shows "/" until they arrive).
            page.goto(f"{base}/projects/")
            page.wait_for_selector(f"text=echolabel demo: {folder.name}")
            page.wait_for_selector(f"text={demo.annotated} / {demo.tasks}")
            page.wait_for_load_state("networkidle")
            shoot(page, out / "demo-projects.jpg")
            projects_text = page.inner_text("body")

            page.goto(demo.url)
            page.wait_for_selector(f"text=Predictions: {predicted}")
            page.wait_for_load_state("networkidle")
            shoot(page, out / "data-manager.jpg")
            manager_text = page.inner_text("body")

            page.goto(f"{base}/projects/{demo.project}/data?task={task['id']}")
            page.wait_for_selector(f"text={score}")
            page.wait_for_load_state("networkidle")
            checked = page.is_checked(f"label:has-text('{label}') input[type=checkbox]")
            shoot(page, out / "task-with-suggestion.jpg")
            task_text = page.inner_text("body")

    assert f"echolabel demo: {folder.name}" in projects_text
    assert f"{demo.annotated} / {demo.tasks}" in projects_text, projects_text
    assert f"Predictions: {predicted}" in manager_text and predicted > 0
    assert checked, f"our suggestion {label!r} is selected on the task"
    assert score in task_text, (score, task_text)
    assert re.search(r"echolabe.*g\d+-s\d+", task_text), "our model version names the tab"
    for shot in out.glob("*.jpg"):
        assert shot.stat().st_size <= MAX_BYTES, shot
