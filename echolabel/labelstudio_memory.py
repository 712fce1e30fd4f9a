"""Label Studio held in memory: the API calls the push and the diverse-first order make
(`echolabel.core.preannotate`, `echolabel.core.diverse_first`), with `LabelStudioClient`'s
signatures.

It lets `bench/preannotate.py` time our side of the push alone (a real Label Studio adds its HTTP
and database time per call), and it is the state behind the tests' fake Label Studio
(tests/fakes.py), which serves it over HTTP. One project: the `project` arguments are accepted
and ignored.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any


class InMemoryLabelStudio:
    """One project's label config, tasks and predictions, as Label Studio would hold them."""

    def __init__(self, tasks: list[dict[str, Any]], label_config: str) -> None:
        self.tasks_by_id = {t["id"]: t for t in tasks}
        self.config = label_config
        self.predictions_by_id: dict[int, dict[str, Any]] = {}
        # Label Studio finds a task's predictions through an index; a scan here would make the
        # bench time this stand-in instead of the refresh.
        self._task_predictions: dict[Any, list[int]] = {}
        self.ids = itertools.count(1)
        self.imports = 0
        self.model_version = "echolabel"
        self.data_updates = 0

    def label_config(self, project: int) -> str:
        return self.config

    def tasks(
        self, project: int, full: bool = False, resolve_uri: bool = True
    ) -> Iterator[dict[str, Any]]:
        for task in self.tasks_by_id.values():
            yield {**task, "data": dict(task["data"]), "predictions": self.predictions(task["id"])}

    def update_task_data(self, task: int, data: dict[str, Any]) -> None:
        self.data_updates += 1
        self.tasks_by_id[task]["data"] = dict(data)

    def import_predictions(self, project: int, predictions: list[dict[str, Any]]) -> int:
        self.imports += 1
        for prediction in predictions:
            pid = next(self.ids)
            self.predictions_by_id[pid] = {"id": pid, **prediction}
            self._task_predictions.setdefault(prediction["task"], []).append(pid)
        return len(predictions)

    def predictions(self, task: int) -> list[dict[str, Any]]:
        ids = self._task_predictions.get(task, [])
        return [self.predictions_by_id[i] for i in ids if i in self.predictions_by_id]

    def update_prediction(self, prediction: int, result: list[Any], score: float) -> None:
        self.predictions_by_id[prediction] |= {"result": result, "score": score}

    def delete_prediction(self, prediction: int) -> None:
        del self.predictions_by_id[prediction]

    def model_versions(self, project: int) -> dict[str, int]:
        versions: dict[str, int] = {}
        for p in self.predictions_by_id.values():
            versions[p["model_version"]] = versions.get(p["model_version"], 0) + 1
        return versions

    def delete_model_version(self, project: int, version: str) -> int:
        doomed = [i for i, p in self.predictions_by_id.items() if p["model_version"] == version]
        for i in doomed:
            del self.predictions_by_id[i]
        return len(doomed)

    def project(self, project: int) -> dict[str, Any]:
        return {"id": project, "model_version": self.model_version}

    def backends(self, project: int) -> list[dict[str, Any]]:
        return [{"title": "echolabel"}]

    def set_model_version(self, project: int, version: str) -> None:
        self.model_version = version

    def close(self) -> None:
        pass
