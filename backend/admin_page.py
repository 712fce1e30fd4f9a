"""The admin page: each project's store state, every job with live progress, the forms that
start jobs, links to the latest evaluation reports and label-QA results, and to the project's
near-duplicate pairs.

Forms go through `Admin` (the same job functions as the CLI and the JSON endpoints). The page is
server-rendered and escaped; a few lines of script poll /admin/jobs, whose rows the server has
already formatted, so the page never builds markup from job data.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from echolabel.core.runtime import Runtime
from echolabel.encoders import available_encoders
from echolabel.encoders.trained_files import encoder_name, list_trained
from echolabel.settings import Settings
from workers.training.selection import SelectionLog

from .admin import Admin

# What the jobs write under <artefacts>/<kind>/<project>/<time>/ that the page links and serves
# read-only; the first file of each kind is the one a link opens.
OUTPUTS = {
    "reports": ("report.html", "report.json"),
    "reviews": ("review.csv", "review.json"),
}
TRAIN_ONLY, TRAIN_AND_REEMBED = "then keep the encoder", "then re-embed with it"
STAMP = re.compile(r"^[0-9]{8}T[0-9]{6}Z$")
_STATUS_ORDER = {"started": 0, "queued": 1, "deferred": 1, "scheduled": 1, "failed": 2}


@dataclass(frozen=True)
class Select:
    """A drop-down of an action's form."""

    name: str
    options: Callable[[Settings], Sequence[str]]
    default: Callable[[Settings], str]


@dataclass(frozen=True)
class Action:
    """One form per project: a button, optional drop-downs, and the Admin method it calls."""

    button: str
    start: Callable[[Admin, int | str, Mapping[str, str]], dict[str, Any]]
    selects: tuple[Select, ...] = ()


def encoder_choices(settings: Settings) -> list[str]:
    """The registered encoders, then those trained on any process (the shared artefacts)."""
    trained = [encoder_name(path.name) for path in list_trained(settings.encoders_dir)]
    return [*available_encoders(), *trained]


# The page's actions, in order; one entry each (URL: POST /admin/projects/<p>/<key>).
ACTIONS: dict[str, Action] = {
    "reembed": Action(
        "Re-embed",
        lambda admin, project, form: admin.start_reembed(project, form["encoder"]),
        (Select("encoder", encoder_choices, lambda s: s.encoder),),
    ),
    "evaluate": Action("Evaluate", lambda admin, project, _: admin.start_evaluation(project)),
    "review": Action("Label QA", lambda admin, project, _: admin.start_review(project)),
    "retrain": Action("Retrain now", lambda admin, project, _: admin.start_retraining(project)),
    "rollback": Action(
        "Roll back encoder", lambda admin, project, _: admin.start_rollback(project)
    ),
    "train": Action(
        "Train encoder",
        lambda admin, project, form: admin.start_training_encoder(
            project, reembed=form["then"] == TRAIN_AND_REEMBED
        ),
        (Select("then", lambda _: (TRAIN_ONLY, TRAIN_AND_REEMBED), lambda _: TRAIN_ONLY),),
    ),
}


def form_values(action: Action, settings: Settings, form: Mapping[str, str]) -> dict[str, str]:
    """The action's drop-down values from a posted form; ValueError names a bad one."""
    values = {}
    for select in action.selects:
        value = form.get(select.name, "")
        options = list(select.options(settings))
        if value not in options:
            raise ValueError(f"{select.name} {value!r} is not one of {', '.join(options)}")
        values[select.name] = value
    return values


def project_summaries(runtime: Runtime) -> list[dict[str, Any]]:
    """Per known project: its live collection, encoder, generation, counts, reports and the
    self-improving loop's records."""
    selection = SelectionLog(runtime.settings.selection_dir)
    out = []
    for project in runtime.projects.known():
        row: dict[str, Any] = {
            "project": project,
            "reports": latest_reports(runtime, project),
            "selection": selection.read(project),
        }
        try:
            info = runtime.store.collection(project)
            if info is not None:
                row.update(
                    collection=info.name,
                    encoder=info.encoder,
                    generation=info.generation,
                    points=runtime.store.count(project),
                    labelled=runtime.store.count(project, labelled=True),
                )
        except Exception as exc:  # one project's store trouble must not hide the others
            row["error"] = f"{type(exc).__name__}: {exc}"
        out.append(row)
    return out


def latest_reports(runtime: Runtime, project: int | str, limit: int = 3) -> list[str]:
    """URLs of the newest evaluation reports and label-QA results, newest first per kind."""
    urls = []
    for kind, (main, _) in OUTPUTS.items():
        folder = runtime.settings.artefacts / kind / str(project)
        if not folder.is_dir():
            continue
        stamps = sorted(
            (p.name for p in folder.iterdir() if STAMP.match(p.name) and (p / main).is_file()),
            reverse=True,
        )
        urls += [report_url(project, stamp, kind) for stamp in stamps[:limit]]
    return urls


def report_url(project: int | str, stamp: str, kind: str = "reports") -> str:
    return f"/admin/{kind}/{quote(str(project), safe='')}/{stamp}/{OUTPUTS[kind][0]}"


def report_file(
    artefacts: Path, kind: str, project: int | str, stamp: str, name: str
) -> Path | None:
    """A job's output file to serve read-only, or None for anything else."""
    if name not in OUTPUTS.get(kind, ()) or not STAMP.match(stamp):
        return None
    root = (artefacts / kind).resolve()
    path = (root / str(project) / stamp / name).resolve()
    return path if path.is_relative_to(root) and path.is_file() else None


def job_rows(jobs: Sequence[Mapping[str, Any]], artefacts: Path) -> list[dict[str, Any]]:
    """Jobs as table rows (running first), every cell already text: the page only fills them."""
    ordered = sorted(jobs, key=lambda j: _STATUS_ORDER.get(str(j.get("status")), 3))
    return [_job_row(job, artefacts) for job in ordered]


def _job_row(job: Mapping[str, Any], artefacts: Path) -> dict[str, Any]:
    progress = job.get("progress") or {}
    done, total = progress.get("done"), progress.get("total")
    parts = []
    if progress.get("stage"):
        parts.append(str(progress["stage"]))
    if total:
        parts.append(f"{done or 0}/{total}")
    if progress.get("images_per_s"):
        parts.append(f"{progress['images_per_s']:.1f} img/s")
    if progress.get("eta_s") is not None and job.get("status") == "started":
        parts.append(f"ETA {progress['eta_s']:.0f} s")
    result = job.get("result")
    outcome = job.get("error") or ""
    report = None
    if not outcome and isinstance(result, Mapping):
        report = _report_of(result, artefacts)
        headline = result.get("headline")
        outcome = headline if isinstance(headline, str) else _brief(result)
    return {
        "id": str(job.get("id")),
        "status": str(job.get("status")),
        "cells": [
            str(job.get("status")),
            str(job.get("id")),
            str(job.get("description") or ""),
            " · ".join(parts),
            outcome,
        ],
        "fraction": (done or 0) / total if total else None,
        "report": report,
    }


def _brief(result: Mapping[str, Any]) -> str:
    """A job's plain values as `key value` pairs (numbers rounded), at most 300 characters."""
    pairs = [
        f"{key} {round(value, 2) if isinstance(value, float) else value}"
        for key, value in result.items()
        if isinstance(value, (int, float, str, bool)) and value is not None
    ]
    return " · ".join(pairs)[:300]


def _report_of(result: Mapping[str, Any], artefacts: Path) -> str | None:
    """The link to what a finished job wrote: an evaluation report or a label-QA result."""
    for kind, key in (("reports", "report_html"), ("reviews", "review_csv")):
        path = result.get(key)
        if not isinstance(path, str):
            continue
        try:
            relative = Path(path).resolve().relative_to((artefacts / kind).resolve())
        except ValueError:
            return None
        parts = relative.parts
        return report_url(parts[0], parts[1], kind) if len(parts) == 3 else None
    return None


def render_admin(
    projects: Sequence[Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    settings: Settings,
    csrf_token: str,
    message: str = "",
) -> str:
    project_rows = "".join(_project_row(p, settings, csrf_token) for p in projects)
    centring = (
        "A project on a pretrained encoder is first <em>centred</em> on its own images once it"
        f" holds {settings.centre_min_images} (no label used)."
        if settings.auto_centre
        else ""
    )
    judged = (
        "the bootstrap interval of its vote's accuracy margin (abstentions as misses) excludes 0"
        if settings.retrain_judge == "vote"
        else "the bootstrap interval of its label-match margin (the share of each image's"
        " nearest labelled neighbours that carry its label) excludes 0 and its vote's"
        " accuracy (abstentions as misses) is not clearly lower (a lower one only while its"
        " interval reaches above 0)"
    )
    if not projects:
        project_rows = '<tr><td colspan="8">no project yet: connect Label Studio</td></tr>'
    job_html = "".join(_job_tr(row) for row in rows) or _NO_JOBS
    note = f'<p class="note">{escape(message)}</p>' if message else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>echolabel admin</title>
<style>{_CSS}</style></head><body>
<h1>echolabel admin</h1>{note}
<h2>Projects</h2>
<table><tr><th>project</th><th>collection</th><th>encoder</th><th>generation</th>
<th>points</th><th>labelled</th><th>latest results</th><th>actions</th></tr>
{project_rows}</table>
<h2>Encoder selection</h2>
<p>Retraining rounds: on the held-out images, a challenger is promoted only when {judged}.
{centring}</p>
<table id="selection"><tr><th>project</th><th>started</th><th>labelled</th><th>decision</th>
<th>challenger</th><th>champion</th><th>label match (challenger / champion)</th>
<th>label-match margin [interval]</th><th>vote accuracy (challenger / champion)</th>
<th>reason</th></tr>
{_selection_rows(projects)}</table>
<h2>Jobs</h2>
<table id="jobs"><thead><tr><th>status</th><th>job</th><th>what</th><th>progress</th>
<th>error or result</th></tr></thead><tbody>{job_html}</tbody></table>
<script>{_POLL}</script>
</body></html>
"""


def _selection_rows(projects: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for project in projects:
        for c in reversed(project.get("selection", {}).get("candidates", [])):
            comparison = c.get("comparison") or {}
            match = margin = accuracy = ""
            if comparison:
                accuracy = (
                    f"{comparison['challenger_accuracy']:.3f} / "
                    f"{comparison['champion_accuracy']:.3f} ({comparison['margin']:+.3f})"
                )
            if "label_match_interval" in comparison:  # rounds judged before 2026-12-07 lack it
                match = (
                    f"{comparison['challenger_label_match']:.3f} / "
                    f"{comparison['champion_label_match']:.3f}"
                )
                low, high = comparison["label_match_interval"]
                margin = f"{comparison['label_match_margin']:+.3f} [{low:+.3f}, {high:+.3f}]"
            cells = [
                project["project"],
                c["started_at"],
                c["labelled"],
                c["decision"],
                c.get("challenger") or "",
                c["champion"],
                match,
                margin,
                accuracy,
                c["reason"],
            ]
            tds = "".join(f"<td>{escape(str(cell))}</td>" for cell in cells)
            rows.append(f'<tr class="{escape(c["decision"].replace(" ", "-"))}">{tds}</tr>')
    return "".join(rows) or '<tr><td colspan="10">no retraining round yet</td></tr>'


def duplicates_url(project: int | str) -> str:
    return f"/projects/{quote(str(project), safe='')}/duplicates"


def _output_name(url: str) -> str:
    """`evaluation 20261202T170517Z` or `label QA …` from an output's URL."""
    kind, stamp = url.split("/")[2], url.split("/")[-2]
    return f"{'label QA' if kind == 'reviews' else 'evaluation'} {stamp}"


def _project_row(project: Mapping[str, Any], settings: Settings, csrf_token: str) -> str:
    p = project["project"]
    reports = " ".join(
        f'<a href="{escape(url)}">{escape(_output_name(url))}</a>' for url in project["reports"]
    )
    if project.get("points"):
        reports += f' <a href="{escape(duplicates_url(p))}">near-duplicates</a>'
    cells = [
        escape(str(project.get(key, ""))) for key in ("collection", "encoder", "generation")
    ] + [escape(str(project.get(key, ""))) for key in ("points", "labelled")]
    if project.get("error"):
        cells[0] = f'<span class="error">{escape(project["error"])}</span>'
    forms = "".join(_form(p, key, action, settings, csrf_token) for key, action in ACTIONS.items())
    tds = "".join(f"<td>{c}</td>" for c in cells)
    return f"<tr><td>{escape(str(p))}</td>{tds}<td>{reports}</td><td>{forms}</td></tr>"


def _form(project: int | str, key: str, action: Action, settings: Settings, csrf_token: str) -> str:
    selects = ""
    for select in action.selects:
        default = select.default(settings)
        options = "".join(
            f"<option{' selected' if o == default else ''}>{escape(o)}</option>"
            for o in select.options(settings)
        )
        selects += f'<select name="{escape(select.name)}">{options}</select>'
    target = f"/admin/projects/{quote(str(project), safe='')}/{key}"
    return (
        f'<form method="post" action="{escape(target)}">'
        f'<input type="hidden" name="csrf" value="{escape(csrf_token)}">{selects}'
        f'<button type="submit">{escape(action.button)}</button></form>'
    )


def _job_tr(row: Mapping[str, Any]) -> str:
    cells = [escape(c) for c in row["cells"]]
    if row["fraction"] is not None:
        cells[3] = f'<progress value="{row["fraction"]:.3f}"></progress> {cells[3]}'
    if row["report"]:
        cells[4] = f'<a href="{escape(row["report"])}">report</a>\n{cells[4]}'
    css = escape(row["status"])
    return f'<tr class="{css}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


_NO_JOBS = '<tr><td colspan="5">no jobs</td></tr>'

# Fills the job table from /admin/jobs every second; text only (textContent), links from the
# server-built `report` URL.
_POLL = """
const body = document.querySelector('#jobs tbody');
async function poll() {
  try {
    const r = await fetch('/admin/jobs', {headers: {Accept: 'application/json'}});
    if (!r.ok) return;
    const rows = (await r.json()).rows;
    body.replaceChildren(...rows.map(row => {
      const tr = document.createElement('tr');
      tr.className = row.status;
      row.cells.forEach((text, i) => {
        const td = tr.insertCell();
        if (i === 3 && row.fraction !== null) {
          const bar = document.createElement('progress');
          bar.value = row.fraction;
          td.append(bar, ' ');
        }
        if (i === 4 && row.report) {
          const a = document.createElement('a');
          a.href = row.report; a.textContent = 'report';
          td.append(a, '\\n');
        }
        td.append(text);
      });
      return tr;
    }));
    if (!rows.length) body.innerHTML = '<tr><td colspan="5">no jobs</td></tr>';
  } finally { setTimeout(poll, 1000); }
}
setTimeout(poll, 1000);
"""

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;
vertical-align:top}form{display:inline-block;margin:0 .5em .2em 0}
tr.failed td{background:#fde8e8}tr.started td{background:#eef6ff}
#jobs td:nth-child(5){white-space:pre-wrap;font:12px/1.4 monospace}
.error{color:#b00}.note{background:#eef8e8;padding:.5em}
"""
