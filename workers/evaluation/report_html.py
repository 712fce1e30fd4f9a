"""The evaluation report as a self-contained HTML page: tables, and plots inlined as PNG."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np


def format_score(value: float | None) -> str:
    """A score for tables: three decimals, or "-" where there is none."""
    return "-" if value is None else f"{value:.3f}"


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
            f"<td>{format_score(vote['accuracy'])}</td><td>{format_score(vote['macro_f1'])}</td>"
            f"<td>{vote['coverage']:.2f}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _choose_k_line(encoders: Mapping[str, Any], name: str) -> str:
    lines = []
    for encoder, result in encoders.items():
        chosen = result["fields"][name]["vote"].get("choose_k")
        if chosen and chosen["best_k"] is not None:
            tried = ", ".join(f"k={k}: {format_score(v)}" for k, v in chosen["candidates"].items())
            lines.append(
                f"{html.escape(encoder)}: best k on a validation split = {chosen['best_k']} "
                f"(micro-F1 {tried}); held-out micro-F1 at it "
                f"{format_score(chosen['held_out_micro_f1'])}"
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
                f"<td>{v['coverage']:.2f}</td><td>{format_score(v['accuracy'])}</td>"
                f"<td>{format_score(v['macro_recall'])}</td>{cells}</tr>"
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
            f"<td>{format_score(table['accuracy_mean'][p])}</td><td>{format_score(table['coverage_mean'][p])}</td>"
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
