"""The neighbour gallery: a task, its top-k labelled neighbours and the vote they gave.

The same `SimilarityModel.suggest` (store search + `echolabel.vote`) as /predict, so the page
shows exactly why a label was suggested. Rendered as a small server-side HTML page (every
label escaped: labels are arbitrary unicode) or as JSON.
"""

from __future__ import annotations

from html import escape
from typing import Any

from echolabel.core.model import SimilarityModel, task_path
from vectorstore import TaskId
from workers.review import browser_label_studio_url, task_link


class TaskNotFound(LookupError):
    """The task has no point in the project's live collection."""


def image_ref(model: SimilarityModel, task: TaskId) -> str:
    """The image reference a task's stored point carries (never taken from the request)."""
    point = model.store.points(model.project, [task], with_vectors=False).get(task)
    if point is None or not point.image:
        raise TaskNotFound(_not_found(model.project, task))
    return point.image


def build_gallery(model: SimilarityModel, task: TaskId) -> dict[str, Any]:
    """The query task, its labelled neighbours (best first) and their vote, as plain data."""
    point = model.store.points(model.project, [task], with_vectors=True).get(task)
    if point is None:
        raise TaskNotFound(_not_found(model.project, task))
    suggestion = model.suggest(point.vector, exclude=[task])
    ls_url = browser_label_studio_url(model.settings)
    project = model.project
    return {
        "project": project,
        "task": point.task,
        "labels": dict(point.labels),
        "thumbnail": task_path(project, point.task) + "/thumbnail",
        "label_studio": task_link(ls_url, project, point.task),
        "model_version": model.model_version,
        "vote": {
            "score": round(suggestion.score, 4),
            "fields": {
                name: {
                    "label": v.label,
                    **({"choices": list(v.suggested)} if v.multiple else {}),
                    "score": round(v.score, 4),
                    "support": v.support,
                    "weights": {label: round(w, 4) for label, w in v.weights.items()},
                    "abstained": v.abstain_reason,
                }
                for name, v in suggestion.votes.items()
            },
        },
        "neighbours": [
            {
                "task": n.task,
                "similarity": round(n.similarity, 4),
                "labels": dict(n.labels),
                "thumbnail": task_path(project, n.task) + "/thumbnail",
                "gallery": task_path(project, n.task) + "/neighbours",
                "label_studio": task_link(ls_url, project, n.task),
            }
            for n in suggestion.neighbours
        ],
    }


def render_gallery(gallery: dict[str, Any]) -> str:
    """The gallery as one small self-contained HTML page (no scripts)."""
    project, task = gallery["project"], gallery["task"]
    votes = "".join(
        f"<tr><th>{escape(name)}</th><td>{_vote_text(v)}</td>"
        f"<td>{_weights_text(v['weights'])}</td></tr>"
        for name, v in gallery["vote"]["fields"].items()
    )
    cards = "".join(
        f'<figure class="n"><a href="{escape(n["gallery"])}"><img src="{escape(n["thumbnail"])}" '
        f'alt="task {escape(str(n["task"]))}" loading="lazy"></a>'
        f"<figcaption><b>{i}.</b> similarity {n['similarity']:.3f}<br>{labels_html(n['labels'])}"
        f"<br>{task_link_html(n['label_studio'], n['task'])}</figcaption></figure>"
        for i, n in enumerate(gallery["neighbours"], 1)
    )
    own = labels_html(gallery["labels"]) if gallery["labels"] else "<i>not labelled</i>"
    own_link = task_link_html(gallery["label_studio"], task)
    title = f"Neighbours of task {escape(str(task))} (project {escape(str(project))})"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_CSS}</style></head><body>
<h1>{title}</h1>
<section class="query"><figure>
<img src="{escape(gallery["thumbnail"])}" alt="task {escape(str(task))}">
<figcaption>this task: {own}<br>{own_link}</figcaption></figure>
<div><h2>Vote of its {len(gallery["neighbours"])} nearest labelled neighbours</h2>
<table><tr><th>field</th><th>suggestion (share of the neighbours' weight)</th><th>weights</th></tr>
{votes}</table>
<p>task certainty (the prediction's score): <b>{gallery["vote"]["score"]:.3f}</b>
· model {escape(str(gallery["model_version"]))}</p></div></section>
<h2>Nearest labelled neighbours</h2><div class="grid">{cards}</div>
</body></html>
"""


def _vote_text(v: dict[str, Any]) -> str:
    if v["abstained"]:
        return f"<i>no suggestion</i>: {escape(v['abstained'])}"
    chosen = ", ".join(v["choices"]) if "choices" in v else v["label"]
    return f"<b>{escape(chosen)}</b> ({v['score']:.2f}, {v['support']} neighbours)"


def _weights_text(weights: dict[str, float]) -> str:
    ranked = sorted(weights.items(), key=lambda item: -item[1])
    return ", ".join(f"{escape(label)} {weight:.2f}" for label, weight in ranked)


def labels_html(labels: dict[str, str | list[str]]) -> str:
    """A task's labels, one field per line (a multi-choice field's choices comma-separated),
    escaped."""
    return "<br>".join(
        f'<span class="f">{escape(name)}</span> <span class="label">'
        f"{escape(value if isinstance(value, str) else ', '.join(value))}</span>"
        for name, value in labels.items()
    )


def task_link_html(url: str | None, task: TaskId) -> str:
    """A link that opens the task in Label Studio (plain text without Label Studio's URL)."""
    if not url:
        return f"task {escape(str(task))}"
    return (
        f'<a href="{escape(url)}" target="_blank" rel="noopener">'
        f"task {escape(str(task))} in Label Studio</a>"
    )


def _not_found(project: int | str, task: TaskId) -> str:
    return (
        f"task {task} of project {project} is not in the store yet: it is embedded when Label "
        "Studio asks for its prediction (Retrieve Predictions) or when the project is indexed"
    )


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.1em}
.query{display:flex;gap:2em;align-items:flex-start}
.query img{width:256px;border:1px solid #999}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:1em}
.n{margin:0}.n img{width:160px;height:160px;object-fit:contain;background:#000}
.f{color:#666}.label{font-weight:600}
"""
