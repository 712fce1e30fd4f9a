"""The admin page: in a real headless Chromium (a running job's progress changing without a
reload, a failed job's reason, the re-embed and evaluate forms starting jobs through Admin,
the latest report); its auth, CSRF and loopback rules through the app."""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import threading
import time

import pytest
from fastapi.testclient import TestClient

from backend.admin_page import _selection_rows
from backend.app import create_app
from backend.pages import is_loopback
from echolabel.core.model import SimilarityModel
from echolabel.embedding import TaskImage
from tests.browser import chromium_page, needs_chromium
from tests.helpers import REDIS_URL, ROOT, TINY_ENCODER_B, dark_and_bright, serving
from tests.label_configs import DARK_BRIGHT_CONFIG
from workers import jobs
from workers.runtime import open_runtime

DOCS = ROOT / "docs" / "screenshots"  # with ECHOLABEL_UPDATE_SCREENSHOTS=1
CONFIG = DARK_BRIGHT_CONFIG
USER, PASSWORD = "reviewer", "pässwörd-9c1f"
LS_KEY = "0123456789abcdef0123456789abcdef01234567"


def index_projects(settings) -> None:
    """Project 5: twelve labelled tasks; project 6: one (its evaluation must fail)."""
    paths = dark_and_bright(settings.local_files_root, 6, size=(48, 48))
    services = open_runtime(dataclasses.replace(settings, redis_url=None))
    try:
        for project in (5, 6):
            SimilarityModel(services, project, CONFIG).setup()
        items = [
            TaskImage(10 + i, path, {"organ": name.split("_")[0]})
            for i, (name, path) in enumerate(sorted(paths.items()))
        ]
        assert not SimilarityModel(services, 5).embed(items).failures
        assert not SimilarityModel(services, 6).embed(items[:1]).failures
    finally:
        services.close()


@pytest.fixture(params=["in-process", "redis"])
def admin_settings(request, settings):
    """Without Redis jobs run in threads of the backend; with Redis (embedded store) its
    in-process RQ worker runs them from the queues."""
    settings = dataclasses.replace(settings, batch_size=2, job_retry_intervals=())
    index_projects(settings)
    if request.param == "redis":
        request.getfixturevalue("redis_db")
        settings = dataclasses.replace(settings, redis_url=REDIS_URL, embed_wait_s=0.0)
    return settings


@pytest.fixture
def stepped_reembed(monkeypatch):
    """Re-embedding that stops after each progress report until the test lets it go on."""
    steps = threading.Semaphore(0)
    free = threading.Event()
    real = jobs.reembed_project

    def stepped(*args, on_progress, **kwargs):
        def hook(progress):
            on_progress(progress)
            if not free.is_set():
                steps.acquire(timeout=120)

        return real(*args, on_progress=hook, **kwargs)

    monkeypatch.setattr(jobs, "reembed_project", stepped)
    yield steps, free
    free.set()
    steps.release(100)


@needs_chromium
def test_admin_page_in_chromium(admin_settings, stepped_reembed, tmp_path):
    steps, free = stepped_reembed
    shots = tmp_path / "shots"
    shots.mkdir()
    app = create_app(admin_settings, listen_host="127.0.0.1")
    jobs_cell = "document.querySelector('#jobs tbody').innerText"
    with serving(app) as url, chromium_page(1300, 700) as page:
        page.goto(f"{url}/admin")
        projects = page.inner_text("table")
        # Re-embed project 5 with another encoder, chosen in the form.
        form = page.locator("form[action='/admin/projects/5/reembed']")
        form.locator("select[name=encoder]").select_option(TINY_ENCODER_B)
        form.locator("button").click()
        page.wait_for_url(re.compile(r"/admin\?started=reembed-5$"))
        assert "started job reembed-5" in page.inner_text(".note")
        page.evaluate("window.notReloaded = true")
        page.wait_for_function(f"{jobs_cell}.includes('embedding · 2/12')", timeout=60_000)
        page.screenshot(path=str(shots / "running-2.png"))
        steps.release()
        page.wait_for_function(f"{jobs_cell}.includes('embedding · 4/12')", timeout=60_000)
        page.screenshot(path=str(shots / "running-4.png"))
        assert page.evaluate("window.notReloaded"), "progress came by polling, not a reload"
        free.set()
        steps.release(100)
        page.wait_for_function(f"{jobs_cell}.includes('switched')", timeout=60_000)
        # Evaluation of project 6 (one labelled task) fails with its reason on the page.
        page.locator("form[action='/admin/projects/6/evaluate'] button").click()
        page.wait_for_function(f"{jobs_cell}.includes('need 2+')", timeout=60_000)
        failed_row = page.inner_text("#jobs tr.failed")
        page.screenshot(path=str(shots / "failed.png"))
        # Evaluation of project 5 finishes; its report is linked from the project's row.
        page.locator("form[action='/admin/projects/5/evaluate'] button").click()
        page.wait_for_function(
            "[...document.querySelectorAll('#jobs tr.finished')]"
            ".some(r => r.innerText.includes('evaluate-5'))",
            timeout=120_000,
        )
        page.goto(f"{url}/admin")
        after = page.inner_text("table")
        report_links = page.eval_on_selector_all(
            "table a[href^='/admin/reports/5/']", "links => links.map(a => a.href)"
        )
        page.screenshot(path=str(shots / "after.png"), full_page=True)
        if os.environ.get("ECHOLABEL_UPDATE_SCREENSHOTS") == "1" and not admin_settings.redis_url:
            page.screenshot(path=str(DOCS / "admin.jpg"), type="jpeg", quality=70)
        page.goto(report_links[0])
        report_title = page.title()
    print("screenshots:", shots)
    assert re.search(r"5\s+echolabel_p5_g1\s+tiny-test\s+1\s+12\s+12", projects), projects
    assert re.search(r"6\s+echolabel_p6_g1\s+tiny-test\s+1\s+1\s+1", projects), projects
    assert "failed" in failed_row and "project 6 has 1 labelled task(s): need 2+" in failed_row
    assert re.search(r"5\s+echolabel_p5_g2\s+tiny-test-b\s+2\s+12\s+12", after), after
    assert len(set(report_links)) == 1 and report_title, report_links


@pytest.fixture
def secured(settings):
    settings = dataclasses.replace(
        settings,
        basic_auth_user=USER,
        basic_auth_pass=PASSWORD,
        label_studio_url="http://label-studio.example:8080",
        label_studio_api_key=LS_KEY,
    )
    index_projects(settings)
    return settings


def basic(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_admin_needs_credentials_and_a_csrf_token_and_nothing_changes_by_get(secured):
    with TestClient(create_app(secured, listen_host="0.0.0.0")) as client:
        admin = client.app.state.echolabel["admin"]
        for path in (
            "/admin",
            "/admin/jobs",
            "/admin/projects",
            "/projects/5/tasks/10/neighbours",
            "/projects/5/tasks/10/thumbnail",
            "/projects/5/duplicates",
        ):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers=basic(password="wrong")).status_code == 401, path
        assert client.post("/admin/projects/5/evaluate", data={}).status_code == 401

        page = client.get("/admin", headers=basic())
        assert page.status_code == 200
        html = page.text
        token = re.search(r'name="csrf" value="([^"]+)"', html).group(1)
        for secret in (LS_KEY, PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()):
            assert secret not in html
        assert "data:image" not in html and "base64" not in html and "\x89PNG" not in html
        assert page.headers["x-frame-options"] == "DENY"
        summary = client.get("/admin/projects", headers=basic()).json()["projects"]
        assert [(p["project"], p["labelled"]) for p in summary] == [(5, 12), (6, 1)]

        # No action by GET, none without the form's token, none from another origin.
        for path in ("/admin/projects/5/evaluate", "/admin/projects/5/reembed"):
            assert client.get(path, headers=basic()).status_code == 405
        refused = [
            client.post("/admin/projects/5/evaluate", headers=basic(), data={}),
            client.post("/admin/projects/5/evaluate", headers=basic(), data={"csrf": "1.abc"}),
            client.post(
                "/admin/projects/5/evaluate",
                headers={**basic(), "Origin": "http://evil.example"},
                data={"csrf": token},
            ),
            client.post(
                "/admin/projects/5/evaluate",
                headers={**basic(), "Referer": "http://evil.example/admin"},
                data={"csrf": token},
            ),
        ]
        assert [r.status_code for r in refused] == [403] * 4
        assert "CSRF" in refused[0].json()["detail"]
        bad_encoder = client.post(
            "/admin/projects/5/reembed",
            headers=basic(),
            data={"csrf": token, "encoder": "../../etc"},
        )
        assert bad_encoder.status_code == 422 and "is not one of" in bad_encoder.json()["detail"]
        assert admin.jobs() == []

        started = client.post(
            "/admin/projects/5/evaluate",
            headers={**basic(), "Origin": "http://testserver"},
            data={"csrf": token},
            follow_redirects=False,
        )
        assert started.status_code == 303
        assert started.headers["location"] == "/admin?started=evaluate-5"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            listed = client.get("/admin/jobs", headers=basic()).json()["jobs"]
            if listed and listed[0]["status"] == "finished":
                break
            time.sleep(0.2)
        assert [j["id"] for j in listed] == ["evaluate-5"] and listed[0]["status"] == "finished"
        row = client.get("/admin/jobs", headers=basic()).json()["rows"][0]
        assert row["report"].startswith("/admin/reports/5/")
        report = client.get(row["report"], headers=basic())
        assert report.status_code == 200 and "<html" in report.text.lower()
        assert client.get(row["report"]).status_code == 401
        for bad in (
            row["report"].replace("report.html", "secret.txt"),
            "/admin/reports/5/..%2F..%2F..%2Fetc/report.html",
            "/admin/reports/..%2F..%2Fprojects/20261202T000000Z/report.json",
        ):
            assert client.get(bad, headers=basic()).status_code == 404, bad

        # A token issued for another user is refused.
        other = re.sub(r"\.[0-9a-f]+$", ".deadbeef", token)
        assert (
            client.post(
                "/admin/projects/5/evaluate", headers=basic(), data={"csrf": other}
            ).status_code
            == 403
        )


def test_pages_are_refused_beyond_loopback_without_basic_auth(settings):
    index_projects(settings)
    with TestClient(create_app(settings, listen_host="0.0.0.0")) as client:
        for path in ("/admin", "/admin/jobs", "/projects/5/tasks/10/neighbours"):
            response = client.get(path)
            assert response.status_code == 403, path
            assert "BASIC_AUTH_USER" in response.json()["detail"]
        assert client.post("/admin/projects/5/evaluate", data={}).status_code == 403
        assert client.get("/health").status_code == 200
        assert client.app.state.echolabel["admin"].jobs() == []
    with TestClient(create_app(settings, listen_host="127.0.0.1")) as client:
        assert client.get("/admin").status_code == 200
        assert client.get("/projects/5/tasks/10/neighbours").status_code == 200
    with TestClient(create_app(settings)) as client:  # address unknown: as if public
        assert client.get("/admin").status_code == 403


def test_loopback_addresses():
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.5", "example.org", "", None]))


def test_serve_tells_the_app_its_listen_address(settings, monkeypatch):
    """`echolabel serve --host` decides whether the pages need basic auth."""
    import uvicorn

    from echolabel import cli

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **_: served.update(app=app))
    monkeypatch.setenv("MODEL_DIR", str(settings.model_dir))
    monkeypatch.setenv("ECHOLABEL_ENCODER", settings.encoder)
    for name in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "REDIS_URL", "QDRANT_URL"):
        monkeypatch.delenv(name, raising=False)
    for host, status in (("0.0.0.0", 403), ("127.0.0.1", 200)):
        assert cli.main(["serve", "--host", host, "--port", "1"]) == 0
        with TestClient(served["app"]) as client:
            assert client.get("/admin").status_code == status, host


def test_label_qa_form_runs_the_review_job_and_links_its_csv(settings):
    """The admin page's Label QA button goes through Admin.start_review; the finished job and
    the project's row link review.csv, served read-only like the evaluation reports."""
    index_projects(settings)
    with TestClient(create_app(settings, listen_host="127.0.0.1")) as client:
        html = client.get("/admin").text
        assert 'action="/admin/projects/5/review"' in html
        assert 'href="/projects/5/duplicates"' in html
        token = re.search(r'name="csrf" value="([^"]+)"', html).group(1)
        started = client.post(
            "/admin/projects/5/review", data={"csrf": token}, follow_redirects=False
        )
        assert started.headers["location"] == "/admin?started=review-5"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            (job,) = client.get("/admin/jobs").json()["rows"]
            if job["status"] in ("finished", "failed"):
                break
            time.sleep(0.2)
        assert job["status"] == "finished", job
        assert re.fullmatch(r"/admin/reviews/5/\d{8}T\d{6}Z/review.csv", job["report"]), job
        csv_text = client.get(job["report"]).text
        assert csv_text.startswith("field,rank,task,label,vote") and csv_text.count("\n") == 13
        assert job["report"] in client.get("/admin").text
        assert client.get(job["report"].replace("review.csv", "report.html")).status_code == 404


def test_train_encoder_form_starts_training_and_shows_the_guard_rail(settings):
    """Project 5 has 6 images a class: the training job refuses (fewer than the default 10 a
    class) and the page shows every class count as the reason."""
    index_projects(settings)
    with TestClient(create_app(settings, listen_host="127.0.0.1")) as client:
        html = client.get("/admin").text
        token = re.search(r'name="csrf" value="([^"]+)"', html).group(1)
        started = client.post(
            "/admin/projects/5/train",
            data={"csrf": token, "then": "then re-embed with it"},
            follow_redirects=False,
        )
        assert started.status_code == 303, started.text
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            (job,) = client.get("/admin/jobs").json()["rows"]
            if job["status"] in ("finished", "failed"):
                break
            time.sleep(0.2)
        assert job["status"] == "failed" and "and re-embed" in job["cells"][2], job
        assert "below 10" in job["cells"][4] and "dark 6" in job["cells"][4], job


def test_encoder_selection_rows_show_both_scores_and_rounds_judged_before_the_label_match():
    comparison = {
        "champion_accuracy": 0.6,
        "challenger_accuracy": 0.7,
        "margin": 0.1,
        "interval": [-0.05, 0.25],
    }
    label_match = {
        "champion_label_match": 0.5,
        "challenger_label_match": 0.62,
        "label_match_margin": 0.12,
        "label_match_interval": [0.03, 0.21],
    }
    record = {
        "started_at": "2026-12-07T16:00:00Z",
        "labelled": 200,
        "champion": "centred:project-5-centred-v1",
        "challenger": "trained:project-5-v1",
        "reason": "…",
    }
    rounds = [
        {**record, "decision": "kept", "comparison": comparison},  # judged before 2026-12-07
        {**record, "decision": "promoted", "comparison": {**comparison, **label_match}},
    ]
    html = _selection_rows([{"project": 5, "selection": {"candidates": rounds}}])
    promoted, kept = re.findall(r'<tr class="(promoted|kept)">(.*?)</tr>', html)
    cells = lambda row: re.findall(r"<td>(.*?)</td>", row[1])  # noqa: E731
    assert cells(promoted)[6:9] == [
        "0.620 / 0.500",
        "+0.120 [+0.030, +0.210]",
        "0.700 / 0.600 (+0.100)",
    ]
    assert cells(kept)[6:9] == ["", "", "0.700 / 0.600 (+0.100)"]
