"""`echolabel doctor` against a real Label Studio: a healthy set-up passes, each broken one is
named with its fix."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from backend.app import create_app
from echolabel.cli import main
from echolabel.labelstudio import LabelStudioError
from echolabel.settings import Settings
from tests.helpers import (
    BASIC_AUTH,
    BUSI,
    TINY_ENCODER,
    annotate_rows,
    busi_rows,
    serving,
    set_up_project,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.labelstudio,
    pytest.mark.skipif(not (BUSI / "labels.csv").exists(), reason=f"{BUSI} is not present"),
]


def doctor(monkeypatch, capsys, env: dict[str, str], *args: str) -> tuple[int, str]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(["doctor", *args])
    return code, capsys.readouterr().out


def test_doctor_names_each_broken_set_up_and_passes_a_healthy_one(
    label_studio, label_studio_admin, label_studio_pat, tmp_path, monkeypatch, capsys
):
    admin = label_studio_admin
    rows = busi_rows()[::130]  # six images, all three findings
    settings = Settings(
        model_dir=tmp_path / "model",
        label_studio_url=label_studio.url,
        label_studio_api_key=label_studio.token,
        basic_auth_user=BASIC_AUTH[0],
        basic_auth_pass=BASIC_AUTH[1],
    )
    env = {
        "MODEL_DIR": str(settings.model_dir),
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "BASIC_AUTH_USER": BASIC_AUTH[0],
        "BASIC_AUTH_PASS": BASIC_AUTH[1],
    }
    app = create_app(settings)
    with serving(app) as backend_url:
        ids = set_up_project(admin, label_studio, rows, "doctor", backend_url)
        project = ids.pop("project")
        annotate_rows(admin, ids, rows[:3])
        assert app.state.echolabel["inbox"].wait_idle(120)
        checks = ["--project", str(project), "--backend-url", backend_url]

        # Healthy, asked of the running backend (its store and encoder): every check passes.
        answer = httpx.get(
            f"{backend_url}/doctor",
            params={"project": project, "backend_url": backend_url},
            auth=BASIC_AUTH,
            timeout=120,
        ).json()
        assert answer["healthy"], answer
        by_name = {c["name"]: c for c in answer["checks"]}
        assert by_name["tasks stored"]["detail"] == "3 embedded, 3 labelled"
        assert "legacy" in by_name["api key"]["detail"]

        # Healthy from the CLI with a personal access token (the store is the backend's).
        code, out = doctor(
            monkeypatch, capsys, env | {"LABEL_STUDIO_API_KEY": label_studio_pat}, *checks
        )
        assert code == 0, out
        assert "personal access token" in out and "✗" not in out

        # A wrong token.
        code, out = doctor(monkeypatch, capsys, env | {"LABEL_STUDIO_API_KEY": "0" * 40}, *checks)
        assert code == 1 and "✗ api key" in out and "personal access token" in out

        # A label config we cannot vote: Label Studio refuses to connect (our /setup says 422).
        text_only = admin.create_project(
            "doctor text",
            '<View><Text name="t" value="$text"/>'
            '<Choices name="c" toName="t"><Choice value="a"/></Choices></View>',
        )
        with pytest.raises(LabelStudioError, match=r"valid ML backend.*422"):
            admin.connect_backend(text_only, backend_url, "echolabel", basic_auth=BASIC_AUTH)

        # Connected, but Label Studio holds no webhook for it (what SSRF protection leaves).
        (hook,) = admin.webhooks(project)
        admin._request("DELETE", f"/api/webhooks/{hook['id']}/")
        code, out = doctor(monkeypatch, capsys, env, *checks)
        assert code == 1 and "✗ webhook" in out and "SSRF_PROTECTION_ENABLED=false" in out
        assert "echolabel connect" in out

    # Label Studio unreachable.
    code, out = doctor(monkeypatch, capsys, env | {"LABEL_STUDIO_URL": "http://127.0.0.1:9"})
    assert code == 1 and "✗ label studio reachable" in out and "LABEL_STUDIO_URL" in out

    # Weights missing for the configured encoder.
    code, out = doctor(
        monkeypatch,
        capsys,
        env | {"ECHOLABEL_ENCODER": "dino_vits8", "ECHOLABEL_WEIGHTS_DIR": str(tmp_path / "none")},
    )
    assert code == 1 and "✗ encoder weights" in out
    assert "echolabel weights download dino_vits8" in out

    # The project's vectors come from another encoder than the configured one.
    code, out = doctor(monkeypatch, capsys, env | {"ECHOLABEL_ENCODER": TINY_ENCODER}, *checks)
    assert code == 1 and "✗ collection encoder" in out
    assert f"echolabel reembed --project {project} --encoder {TINY_ENCODER}" in out


def test_doctor_on_a_stock_label_studio_with_ssrf_protection_and_legacy_tokens_off(
    tmp_path, monkeypatch, capsys
):
    """Label Studio as it ships (SSRF protection on): connecting our loopback backend saves it
    as Connected but creates no webhook, and doctor says so. Then the organisation turns
    legacy tokens off: a legacy key is refused with the fix, a personal access token works."""
    from echolabel.labelstudio import LabelStudioClient
    from tests.helpers import label_studio_server, serve_images
    from tests.label_configs import ORGAN_FINDING_CONFIG as CONFIG

    server = label_studio_server(tmp_path / "stock", SSRF_PROTECTION_ENABLED="true")
    rows = busi_rows()[::260]
    env = {
        "MODEL_DIR": str(tmp_path / "model"),
        "LABEL_STUDIO_URL": server.url,
        "LABEL_STUDIO_API_KEY": server.token,
    }
    with server:
        admin = LabelStudioClient(
            Settings(label_studio_url=server.url, label_studio_api_key=server.token)
        )
        pat = admin.create_personal_access_token()
        app = create_app(
            Settings(
                model_dir=tmp_path / "model",
                label_studio_url=server.url,
                label_studio_api_key=server.token,
            )
        )
        with serving(app) as backend_url:
            folder = serve_images(server, rows, "stock")
            project = admin.create_project("stock", CONFIG)
            admin.add_local_storage(project, str(folder))
            admin.import_tasks(
                project,
                [{"image": f"/data/local-files/?d=stock/{Path(r['image']).name}"} for r in rows],
            )
            try:
                admin.connect_backend(project, backend_url, "echolabel")
            except LabelStudioError as refused:
                assert "403" in str(refused), refused
            assert admin.backends(project), "Label Studio saved the backend (shown Connected)"
            assert not admin.webhooks_to(project, backend_url), "and created no webhook"
            checks = ["--project", str(project), "--backend-url", backend_url]

            code, out = doctor(monkeypatch, capsys, env, *checks)
            assert code == 1 and "✓ backend connected" in out and "✗ webhook" in out, out
            assert "SSRF_PROTECTION_ENABLED=false" in out and "✓ sample image" in out

            admin._request(
                "POST",
                "/api/jwt/settings",
                json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": False},
            )
            code, out = doctor(monkeypatch, capsys, env, *checks)
            assert code == 1 and "✗ api key" in out and "personal access token" in out, out

            code, out = doctor(monkeypatch, capsys, env | {"LABEL_STUDIO_API_KEY": pat}, *checks)
            assert "✓ api key: accepted: personal access token" in out, out
            assert "✓ sample image" in out and "✗ webhook" in out
        admin.close()
