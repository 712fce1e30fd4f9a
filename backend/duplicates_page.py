"""The near-duplicate pairs of a project, side by side: both thumbnails, their labels and
similarity, and whether the pair's labels conflict (the same image labelled twice differently).

The pairs come from `workers.jobs.find_project_duplicates` (the same function `echolabel
duplicates --project` prints), run in the backend on its own store.
"""

from __future__ import annotations

from html import escape
from typing import Any

from echolabel.core.model import task_path

from .gallery import labels_html, task_link_html


def render_duplicates(result: dict[str, Any]) -> str:
    project = result["project"]
    rows = "".join(_pair(project, i, pair) for i, pair in enumerate(result["pairs"], 1))
    conflicts = sum(1 for pair in result["pairs"] if not pair["same_labels"])
    title = f"Near-duplicates in project {escape(str(project))}"
    summary = (
        f"{len(result['pairs'])} pair(s) at cosine ≥ {result['threshold']:.3f} among "
        f"{result['tasks']} tasks, in {len(result['groups'])} groups; "
        f"<b>{conflicts}</b> with conflicting labels"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_CSS}</style></head><body>
<h1>{title}</h1><p>{summary}. Another threshold: <code>?threshold=0.95</code>.</p>
{rows or "<p>No pair above the threshold.</p>"}
</body></html>
"""


def _pair(project: int | str, number: int, pair: dict[str, Any]) -> str:
    sides = "".join(
        f'<figure><a href="{escape(task_path(project, pair[side]))}/neighbours">'
        f'<img src="{escape(task_path(project, pair[side]))}/thumbnail" '
        f'alt="task {escape(str(pair[side]))}" loading="lazy"></a>'
        f"<figcaption>{labels_html(pair['labels_' + side]) or '<i>not labelled</i>'}"
        f"<br>{task_link_html(pair['link_' + side], pair[side])}</figcaption></figure>"
        for side in ("a", "b")
    )
    flag = "" if pair["same_labels"] else ' <span class="conflict">labels conflict</span>'
    return (
        f'<section class="pair{"" if pair["same_labels"] else " bad"}">'
        f"<h2>{number}. similarity {pair['similarity']:.4f}{flag}</h2>{sides}</section>"
    )


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1em;margin:.2em 0;width:100%}
.pair{display:flex;flex-wrap:wrap;gap:1em;border-top:1px solid #ddd;padding:.6em 0}
.pair.bad h2{color:#a40000}.conflict{background:#fde7e7;padding:0 .4em}
figure{margin:0}img{width:200px;height:200px;object-fit:contain;background:#000}
.f{color:#666}.label{font-weight:600}
"""
