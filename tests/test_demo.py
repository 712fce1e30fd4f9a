"""`echolabel demo` on a copy of part of BUSI: a real Label Studio whose unannotated tasks carry
our predictions; afterwards every process it started is gone and the folder is unchanged."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from echolabel.labelstudio import LabelStudioClient
from echolabel.settings import Settings
from tests.helpers import SHARED_DATA, busi_demo

BUSI = SHARED_DATA / "busi"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.labelstudio,
    pytest.mark.skipif(not (BUSI / "labels.csv").exists(), reason=f"{BUSI} is not present"),
]


def checksums(folder) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_sets_up_label_studio_with_predictions_and_leaves_nothing_behind(tmp_path):
    folder = tmp_path / "busi-subset"
    demo_context = busi_demo(folder)
    rows = (folder / "labels.csv").read_text().splitlines()[1:]
    before = checksums(folder)

    with demo_context as demo:
        pids = [demo.label_studio._process.pid, demo.backend_process.pid]
        client = LabelStudioClient(
            Settings(label_studio_url=demo.label_studio.url, label_studio_api_key=demo.token)
        )
        tasks = list(client.tasks(demo.project, full=True))
        unannotated = [t for t in tasks if not t["annotations"]]
        predicted = [t for t in unannotated if t["predictions"]]
        assert len(tasks) == len(rows) and demo.annotated == len(tasks) - len(unannotated)
        # The others abstained (too few or too split neighbours): no prediction by design.
        assert len(predicted) >= len(unannotated) / 2
        for task in predicted:
            (prediction,) = task["predictions"]
            assert prediction["result"][0]["from_name"] == "finding"
        client.close()
    assert not any(alive(pid) for pid in pids), "every process the demo started is gone"
    assert checksums(folder) == before, "the demo never writes inside the images folder"


def test_demo_without_labels_lets_the_user_annotate_and_see_suggestions_appear(tmp_path):
    """No CSV: the images come in unlabelled with the classes from --choices; annotations
    made in Label Studio reach the backend, and the next Retrieve Predictions suggests."""
    import httpx

    from echolabel.demo import running_demo
    from tests.helpers import LABEL_STUDIO_HOME, busi_subset, choices_result

    folder = busi_subset(tmp_path / "unlabelled", every=60)
    (folder / "labels.csv").unlink()  # a folder of images, nothing else
    before = checksums(folder)
    with running_demo(
        folder,
        None,
        [],
        home=LABEL_STUDIO_HOME,
        choices=["benign", "malignant", "normal"],
        say=lambda _: None,
    ) as demo:
        client = LabelStudioClient(
            Settings(label_studio_url=demo.label_studio.url, label_studio_api_key=demo.token)
        )
        config = client.label_config(demo.project)
        assert all(f'<Choice value="{c}"/>' in config for c in ("benign", "malignant", "normal"))
        tasks = list(client.tasks(demo.project, full=True))
        assert demo.annotated == 0 and len(tasks) == len(before)
        assert not any(t["annotations"] or t["predictions"] for t in tasks)

        annotated, rest = tasks[:6], [t["id"] for t in tasks[6:]]
        for task in annotated:  # one class everywhere: the vote cannot abstain
            client.annotate(task["id"], choices_result({"label": "benign"}))
        deadline = time.monotonic() + 120
        while httpx.get(f"{demo.backend_url}/health").json()["webhooks_pending"]:
            assert time.monotonic() < deadline, "the backend did not apply the annotations"
            time.sleep(0.5)
        client.retrieve_predictions(demo.project, rest)
        suggested = [p for task in rest for p in client.predictions(task)]
        client.close()
    assert len(suggested) == len(rest)
    assert {p["result"][0]["value"]["choices"][0] for p in suggested} == {"benign"}
    assert all(p["model_version"].startswith("echolabel-") for p in suggested)
    assert checksums(folder) == before
