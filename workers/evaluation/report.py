"""The evaluation report: the papers' label-match metrics per field and encoder, as
`report.json` (a contract other tools read) and a self-contained `report.html` with plots."""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from echolabel.vote import is_multi_choice
from workers.review.duplicates import near_duplicate_pairs

from .learning_curve import learning_curve
from .metrics import (
    choose_k,
    label_match,
    leave_one_out_neighbours,
    precision_at_k,
    vote_metrics,
)
from .pixels import pixel_metrics

SCHEMA_VERSION = 1

# The metrics here (same label in the top k, P@k, the vote's accuracy and confusion) compare
# one label per image; a multi-choice field's label is a set of choices.
MULTI_CHOICE_SKIPPED = (
    "multi-choice field (a label is a list of choices): the evaluation's metrics are "
    "single-label; not evaluated"
)


def evaluate_vectors(
    vectors: np.ndarray,
    labels: Mapping[str, Sequence[str | None]],
    *,
    groups: Sequence[str | None] | None = None,
    k: int = 10,
    min_class_size: int = 20,
    min_neighbours: int = 3,
    min_score: float = 0.5,
    thumbnails: np.ndarray | None = None,
    k_candidates: Sequence[int] = (),
    near_duplicate_threshold: float | None = None,
    learning_curve_seeds: Sequence[int] = (),
) -> dict[str, Any]:
    """Every metric for one encoder's vectors, per label field (leave-one-out; with `groups`,
    leave-patient-out too); with `thumbnails`, pixel metrics of the retrieved sets; with
    `k_candidates`, the k that a validation split prefers (`choose_k`). With
    `near_duplicate_threshold`, a query's near-duplicates (cosine ≥ it) are never its
    neighbours; with `learning_curve_seeds`, an annotation session is replayed per seed
    (`learning_curve`).

    Multi-choice fields (lists of choices) are not evaluated: they are listed under
    `skipped_fields` with the reason."""
    skipped = {name: MULTI_CHOICE_SKIPPED for name, ls in labels.items() if is_multi_choice(ls)}
    labels = {name: ls for name, ls in labels.items() if name not in skipped}
    if not labels:
        raise ValueError(
            f"nothing to evaluate: every field ({', '.join(sorted(skipped))}) is multi-choice, "
            "and the evaluation's metrics are single-label"
        )
    views = {"leave_one_out": None}
    if groups is not None and any(g is not None for g in groups):
        views["leave_patient_out"] = groups
    out: dict[str, Any] = {}
    for view, view_groups in views.items():
        retrieve = max([k, *k_candidates])
        all_indices, all_sims = leave_one_out_neighbours(
            vectors, retrieve, groups=view_groups, exclude_above=near_duplicate_threshold
        )
        indices, sims = all_indices[:, :k], all_sims[:, :k]
        if thumbnails is not None:
            out.setdefault("pixels", {})[view] = pixel_metrics(thumbnails, indices)
        fields: dict[str, Any] = {}
        for name, field_labels in labels.items():
            match = label_match(field_labels, indices, k=k, min_class_size=min_class_size)
            precision = precision_at_k(field_labels, indices)
            votes = vote_metrics(
                field_labels,
                indices,
                sims,
                field=name,
                k=k,
                min_neighbours=min_neighbours,
                min_score=min_score,
            )
            classes = {
                cls: {**stats, "precision_at_k": precision["per_class"].get(cls, {})}
                for cls, stats in match["per_class"].items()
            }
            if k_candidates:
                votes["choose_k"] = choose_k(
                    field_labels,
                    all_indices,
                    all_sims,
                    k_candidates,
                    field=name,
                    groups=view_groups,
                )
            fields[name] = {
                **{key: value for key, value in match.items() if key != "per_class"},
                "classes": classes,
                "precision_at_k": {"micro": precision["micro"], "macro": precision["macro"]},
                "vote": votes,
            }
        out[view] = fields
    # The contract's `fields` is the leave-patient-out view when patients are known.
    out["fields"] = out.get("leave_patient_out", out["leave_one_out"])
    if skipped:
        out["skipped_fields"] = skipped
    if near_duplicate_threshold is not None:
        out["near_duplicates_excluded"] = {
            "threshold": near_duplicate_threshold,
            "pairs": len(near_duplicate_pairs(vectors, near_duplicate_threshold, k)),
        }
    if learning_curve_seeds:
        out["learning_curve"] = learning_curve(
            vectors,
            labels,
            seeds=learning_curve_seeds,
            k=k,
            min_neighbours=min_neighbours,
            min_score=min_score,
            exclude_above=near_duplicate_threshold,
        )
    return out


def new_report(
    *,
    command: str,
    k: int,
    min_neighbours: int,
    min_score: float,
    min_class_size: int,
    dataset: Mapping[str, Any],
) -> dict[str, Any]:
    """The report's header; encoders are added under `encoders` as they are measured."""
    return {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "k": k,
        "settings": {
            "min_neighbours": min_neighbours,
            "min_score": min_score,
            "min_class_size": min_class_size,
        },
        "dataset": dict(dataset),
        "encoders": {},
    }


def write_report(report: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write report.json and report.html into out_dir; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2, default=_plain))
    html_path = out_dir / "report.html"
    html_path.write_text(render_html(report))
    return json_path, html_path


def headline(report: Mapping[str, Any]) -> str:
    """The table the CLI prints: per field and encoder, the papers' headline numbers."""
    rows = [
        f"{'field':12} {'encoder':20} {'same@10':>8} {'random':>7} {'P@1 mi':>7} "
        f"{'P@10 ma':>8} {'vote acc':>8} {'coverage':>8}"
    ]
    for encoder, result in report["encoders"].items():
        for name, f in result["fields"].items():
            vote = f["vote"]
            rows.append(
                f"{name:12} {encoder:20} {f['weighted_same_in_top10']:8.2f} "
                f"{f['weighted_random_expectation']:7.2f} {f['precision_at_k']['micro']['1']:7.3f} "
                f"{f['precision_at_k']['macro']['10']:8.3f} {_num(vote['accuracy']):>8} "
                f"{vote['coverage']:8.2f}"
            )
    for encoder, result in report["encoders"].items():
        for name, reason in result.get("skipped_fields", {}).items():
            rows.append(f"{name:12} {encoder:20} skipped: {reason}")
    held_out = report["dataset"].get("held_out")
    if held_out:
        rows.append(
            f"trained encoder(s) {', '.join(held_out['trained_encoders'])}: evaluated on "
            f"held-out images only ({held_out['excluded_training_images']} training images "
            "left out as queries and neighbours, for every encoder)"
        )
    return "\n".join(rows)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# -- HTML -------------------------------------------------------------------------------------


def render_html(report: Mapping[str, Any]) -> str:
    """A self-contained page (plots inlined as PNG), readable offline."""
    encoders = report["encoders"]
    field_names = list(next(iter(encoders.values()))["fields"])
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>echolabel evaluation</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%}.meta{color:#555}</style></head><body>",
        "<h1>echolabel evaluation</h1>",
        f"<p class='meta'>{html.escape(report['dataset']['description'])} — "
        f"{report['dataset']['items']} {report['dataset'].get('unit', 'images')}, "
        f"fingerprint {report['dataset']['fingerprint']}; "
        f"k={report['k']}; leave-one-out"
        f"{' and leave-patient-out' if report['dataset'].get('groups') else ''}.<br>"
        f"command: <code>{html.escape(report['command'])}</code></p>",
        _held_out_line(report),
    ]
    for encoder, result in encoders.items():
        excluded = result.get("near_duplicates_excluded")
        if excluded:
            parts.append(
                f"<p class='meta'>{html.escape(encoder)}: near-duplicates (cosine ≥ "
                f"{excluded['threshold']}) excluded from each query's neighbours; "
                f"{excluded['pairs']} such pairs.</p>"
            )
    skipped = {
        n: r for result in encoders.values() for n, r in result.get("skipped_fields", {}).items()
    }
    for name, reason in skipped.items():
        parts.append(
            f"<p class='meta'>Field “{html.escape(name)}” skipped: {html.escape(reason)}.</p>"
        )
    for name in field_names:
        parts.append(f"<h2>Field “{html.escape(name)}”</h2>")
        parts.append(_summary_table(encoders, name))
        parts.append(_choose_k_line(encoders, name))
        parts.append(_class_table(encoders, name))
        for title, draw in (
            (
                "Same label in the top k, per class (bars) vs random expectation (dots)",
                _plot_same_label,
            ),
            ("Precision at k (micro solid, macro dashed)", _plot_precision),
            ("Coverage and accuracy as the abstain threshold moves", _plot_coverage),
            ("Calibration of the vote score", _plot_calibration),
        ):
            png = _png(lambda ax, d=draw, n=name: d(ax, encoders, n))
            parts.append(
                f"<h3>{title}</h3><img alt='{html.escape(title)}' "
                f"src='data:image/png;base64,{png}'>"
            )
        for encoder, result in encoders.items():
            confusion = result["fields"][name]["vote"]["confusion"]
            parts.append(f"<h3>Confusion of the vote — {html.escape(encoder)}</h3>")
            parts.append(_confusion_table(confusion))
        for encoder, result in encoders.items():
            if "learning_curve" in result:
                parts.append(_learning_curve_section(encoder, result["learning_curve"], name))
    if any("pixels" in result for result in encoders.values()):
        parts.append("<h2>Pixel similarity of the retrieved sets</h2>")
        parts.append(_pixel_table(encoders))
    if any("volume_vote" in result for result in encoders.values()):
        parts.append(_volume_section(report))
    parts.append("</body></html>")
    return "\n".join(parts)


def _held_out_line(report: Mapping[str, Any]) -> str:
    held_out = report["dataset"].get("held_out")
    if not held_out:
        return ""
    trained = ", ".join(
        f"{html.escape(name)} (trained on {report['encoders'][name]['trained']['training_images']}"
        " images)"
        for name in held_out["trained_encoders"]
        if "trained" in report["encoders"].get(name, {})
    )
    return (
        f"<p class='meta'><b>Trained encoders</b>: {trained}. Held-out images only: the "
        f"{held_out['excluded_training_images']} images they were trained on are neither "
        "queries nor neighbours, for every encoder.</p>"
    )


def _summary_table(encoders: Mapping[str, Any], name: str) -> str:
    head = (
        "<tr><th>encoder</th><th>same label in top k</th><th>random</th><th>lift</th>"
        "<th>P@1 micro</th><th>P@10 micro</th><th>P@1 macro</th><th>P@10 macro</th>"
        "<th>vote accuracy</th><th>macro F1</th><th>coverage</th></tr>"
    )
    rows = []
    for encoder, result in encoders.items():
        f = result["fields"][name]
        same, rand = f["weighted_same_in_top10"], f["weighted_random_expectation"]
        p, vote = f["precision_at_k"], f["vote"]
        rows.append(
            f"<tr><td>{html.escape(encoder)}{' (trained)' if 'trained' in result else ''}</td>"
            f"<td>{same:.2f}</td><td>{rand:.2f}</td>"
            f"<td>{same / rand if rand else float('nan'):.2f}</td>"
            f"<td>{p['micro']['1']:.3f}</td><td>{p['micro']['10']:.3f}</td>"
            f"<td>{p['macro']['1']:.3f}</td><td>{p['macro']['10']:.3f}</td>"
            f"<td>{_num(vote['accuracy'])}</td><td>{_num(vote['macro_f1'])}</td>"
            f"<td>{vote['coverage']:.2f}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _choose_k_line(encoders: Mapping[str, Any], name: str) -> str:
    lines = []
    for encoder, result in encoders.items():
        chosen = result["fields"][name]["vote"].get("choose_k")
        if chosen and chosen["best_k"] is not None:
            tried = ", ".join(f"k={k}: {_num(v)}" for k, v in chosen["candidates"].items())
            lines.append(
                f"{html.escape(encoder)}: best k on a validation split = {chosen['best_k']} "
                f"(micro-F1 {tried}); held-out micro-F1 at it "
                f"{_num(chosen['held_out_micro_f1'])}"
            )
    return "<p>" + "<br>".join(lines) + "</p>" if lines else ""


def _class_table(encoders: Mapping[str, Any], name: str) -> str:
    first = next(iter(encoders.values()))["fields"][name]["classes"]
    head = (
        "<tr><th>class</th><th>images</th><th>random</th>"
        + "".join(f"<th>{html.escape(e)}</th>" for e in encoders)
        + "</tr>"
    )
    rows = []
    for cls, stats in first.items():
        cells = "".join(
            f"<td>{encoders[e]['fields'][name]['classes'][cls]['same_in_top10']:.2f}</td>"
            for e in encoders
        )
        rows.append(
            f"<tr><td>{html.escape(str(cls))}</td><td>{stats['count']}</td>"
            f"<td>{stats['random_expectation']:.2f}</td>{cells}</tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _pixel_table(encoders: Mapping[str, Any]) -> str:
    head = (
        "<tr><th>encoder</th><th>view</th><th>histogram similarity: top k</th>"
        "<th>random</th><th>MSE: top k</th><th>random</th></tr>"
    )
    rows = []
    for encoder, result in encoders.items():
        for view, metrics in result.get("pixels", {}).items():
            top, rand = metrics["retrieved"], metrics["random"]
            rows.append(
                f"<tr><td>{html.escape(encoder)}</td><td>{view.replace('_', ' ')}</td>"
                f"<td>{top['histogram_similarity']:.3f}</td>"
                f"<td>{rand['histogram_similarity']:.3f}</td>"
                f"<td>{top['mse']:.4f}</td><td>{rand['mse']:.4f}</td></tr>"
            )
    return f"<table>{head}{''.join(rows)}</table>"


def _volume_section(report: Mapping[str, Any]) -> str:
    """Volume-level results (workers.evaluation.volumes): recall per class, as in Khun Jush
    et al.'s tables, and the confusion of the count vote."""
    encoders = report["encoders"]
    parts = [
        "<h2>Volumes: count vote over slices (leave-one-volume-out)</h2>",
        f"<p>Sampling {html.escape(str(report['dataset'].get('sampling')))}; each slice is "
        "voted by its top k among the other volumes' slices; the volume takes the label most "
        "of its slices got. Recall counts an abstaining volume as a miss.</p>",
    ]
    fields = list(next(iter(encoders.values())).get("volume_vote", {}))
    for name in fields:
        classes = list(next(iter(encoders.values()))["volume_vote"][name]["per_class"])
        head = (
            "<tr><th>encoder</th><th>volumes</th><th>coverage</th><th>accuracy</th>"
            "<th>macro recall</th>"
            + "".join(f"<th>recall {html.escape(str(c))}</th>" for c in classes)
            + "</tr>"
        )
        rows = []
        for encoder, result in encoders.items():
            v = result["volume_vote"][name]
            cells = "".join(f"<td>{v['per_class'][c]['recall']:.3f}</td>" for c in classes)
            rows.append(
                f"<tr><td>{html.escape(encoder)}</td><td>{v['volumes']}</td>"
                f"<td>{v['coverage']:.2f}</td><td>{_num(v['accuracy'])}</td>"
                f"<td>{_num(v['macro_recall'])}</td>{cells}</tr>"
            )
        parts.append(f"<h3>Field “{html.escape(name)}”</h3><table>{head}{''.join(rows)}</table>")
        for encoder, result in encoders.items():
            parts.append(f"<h4>Confusion of the volume vote — {html.escape(encoder)}</h4>")
            parts.append(_confusion_table(result["volume_vote"][name]["confusion"]))
    return "\n".join(parts)


def _confusion_table(confusion: Mapping[str, Any]) -> str:
    classes = confusion["classes"]
    head = (
        "<tr><th>true \\ voted</th>"
        + "".join(f"<th>{html.escape(str(c))}</th>" for c in classes)
        + "</tr>"
    )
    rows = "".join(
        f"<tr><td>{html.escape(str(c))}</td>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>"
        for c, row in zip(classes, confusion["matrix"], strict=True)
    )
    return f"<table>{head}{rows}</table>"


def _png(draw: Callable[[Any], None]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.6), dpi=90)
    draw(axes)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _plot_same_label(ax: Any, encoders: Mapping[str, Any], name: str) -> None:
    classes = list(next(iter(encoders.values()))["fields"][name]["classes"])
    width = 0.8 / max(1, len(encoders))
    x = np.arange(len(classes))
    for i, (encoder, result) in enumerate(encoders.items()):
        stats = result["fields"][name]["classes"]
        ax.bar(x + i * width, [stats[c]["same_in_top10"] for c in classes], width, label=encoder)
    first = next(iter(encoders.values()))["fields"][name]["classes"]
    ax.plot(
        x + 0.4 - width / 2, [first[c]["random_expectation"] for c in classes], "ko", label="random"
    )
    ax.set_xticks(x + 0.4 - width / 2, [str(c) for c in classes], rotation=30, ha="right")
    ax.set_ylabel("same label in top k")
    ax.legend(fontsize=8)


def _plot_precision(ax: Any, encoders: Mapping[str, Any], name: str) -> None:
    for encoder, result in encoders.items():
        p = result["fields"][name]["precision_at_k"]
        ks = sorted(p["micro"], key=int)
        line = ax.plot(
            [int(k) for k in ks], [p["micro"][k] for k in ks], marker="o", label=f"{encoder} micro"
        )[0]
        ax.plot(
            [int(k) for k in ks],
            [p["macro"][k] for k in ks],
            marker="s",
            linestyle="--",
            color=line.get_color(),
            label=f"{encoder} macro",
        )
    ax.set_xlabel("k")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)


def _plot_coverage(ax: Any, encoders: Mapping[str, Any], name: str) -> None:
    for encoder, result in encoders.items():
        curve = result["fields"][name]["vote"]["coverage_curve"]
        thresholds = [point["threshold"] for point in curve]
        line = ax.plot(
            thresholds, [point["coverage"] for point in curve], label=f"{encoder} coverage"
        )[0]
        ax.plot(
            thresholds,
            [np.nan if point["accuracy"] is None else point["accuracy"] for point in curve],
            linestyle="--",
            color=line.get_color(),
            label=f"{encoder} accuracy",
        )
    ax.set_xlabel("minimum winner share (ECHOLABEL_MIN_SCORE)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)


def _plot_calibration(ax: Any, encoders: Mapping[str, Any], name: str) -> None:
    ax.plot([0, 1], [0, 1], color="#999", linewidth=1, label="perfect")
    for encoder, result in encoders.items():
        bins = [b for b in result["fields"][name]["vote"]["calibration"] if b["count"]]
        ax.plot(
            [b["mean_score"] for b in bins],
            [b["accuracy"] for b in bins],
            marker="o",
            label=encoder,
        )
    ax.set_xlabel("vote score (winner share)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)


def _learning_curve_section(encoder: str, curve: Mapping[str, Any], name: str) -> str:
    """Accuracy and coverage of the suggestions on the not-yet-labelled tasks, per order."""
    title = (
        f"Learning curve — {encoder}: suggestions on the tasks not labelled yet, "
        f"mean ± sd over {len(curve['seeds'])} seed(s)"
    )
    png = _png(lambda ax: _plot_learning_curve(ax, curve, name))
    head = "<tr><th>labelled</th>" + "".join(
        f"<th>{order.replace('_', ' ')}: accuracy</th><th>coverage</th>"
        for order in curve["orders"]
    )
    rows = []
    for p, size in enumerate(curve["sizes"]):
        cells = "".join(
            f"<td>{_num(table['accuracy_mean'][p])}</td><td>{_num(table['coverage_mean'][p])}</td>"
            for table in (curve["orders"][order][name] for order in curve["orders"])
        )
        rows.append(f"<tr><td>{size}</td>{cells}</tr>")
    return (
        f"<h3>{html.escape(title)}</h3><img alt='learning curve' "
        f"src='data:image/png;base64,{png}'><table>{head}</tr>{''.join(rows)}</table>"
    )


def _plot_learning_curve(ax: Any, curve: Mapping[str, Any], name: str) -> None:
    for order, style in zip(curve["orders"], ("-", "--", ":"), strict=False):
        table = curve["orders"][order][name]
        x = np.array(table["labelled"])
        for measure, colour in (("accuracy", "tab:blue"), ("coverage", "tab:orange")):
            mean = np.array([np.nan if v is None else v for v in table[f"{measure}_mean"]])
            sd = np.array([np.nan if v is None else v for v in table[f"{measure}_std"]])
            ax.plot(x, mean, style, marker="o", color=colour, label=f"{measure}, {order}")
            ax.fill_between(x, mean - sd, mean + sd, color=colour, alpha=0.12)
    ax.set_xscale("log")
    ax.set_xlabel("tasks labelled")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
