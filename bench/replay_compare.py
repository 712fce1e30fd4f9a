"""Pool `echolabel evaluate --learning-curve` replays of the retraining loop and compare two.

Each report's `learning_curve_retraining` holds one session per seeded order. This prints, for
the reports given as `--after` (and `--before`, if any), the mean over orders at every curve
point of the right rate (abstentions as misses), accuracy and coverage, self-improving and
frozen; then, for the orders both sides replayed, the paired difference of the right rate at
`--at` labels with its standard error, the orders better and worse, and how many reach the
bar: the frozen encoder with every label, voted leave-one-out (the report's own `vote`).

    python -m bench.replay_compare --field finding --before out-0/report.json \
        --after new-0/report.json new-10/report.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MEASURES = ("right_rate", "accuracy", "coverage")


def sessions(reports: Sequence[Path]) -> tuple[dict[int, dict[str, Any]], dict[str, float]]:
    """Every replayed session by its order's seed (a later report wins a repeated seed), and
    the bar of the first report that has one, per field: {field: right rate}."""
    by_seed: dict[int, dict[str, Any]] = {}
    bars: dict[str, float] = {}
    for path in reports:
        report = json.loads(path.read_text())
        for encoder in report["encoders"].values():
            for session in encoder.get("learning_curve_retraining", {}).get("sessions", []):
                by_seed[session["seed"]] = session
            for name, field in encoder.get("fields", {}).items():
                vote = field.get("vote")
                if vote and vote.get("queries") and name not in bars:
                    bars[name] = vote["accuracy"] * vote["voted"] / vote["queries"]
    return by_seed, bars


def point(session: Mapping[str, Any], labelled: int) -> Mapping[str, Any] | None:
    return next((p for p in session["points"] if p["labelled"] == labelled), None)


def curve_table(by_seed: Mapping[int, Mapping[str, Any]], field: str) -> list[str]:
    """Mean over orders at each point, self-improving and frozen."""
    lines = [
        f"| labelled | orders | right rate | accuracy | coverage | frozen: right rate | accuracy "
        f"| coverage | orders promoted ({field}) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    points = sorted({p["labelled"] for s in by_seed.values() for p in s["points"]})
    for labelled in points:
        found = [p for s in by_seed.values() if (p := point(s, labelled)) is not None]
        cells = []
        for curve in ("fields", "frozen"):
            for measure in MEASURES:
                values = [p[curve][field][measure] for p in found]
                kept = [v for v in values if v is not None]
                cells.append(f"{np.mean(kept):.3f}" if kept else "—")
        promoted = sum(p["promotions"] > 0 for p in found)
        lines.append(f"| {labelled} | {len(found)} | " + " | ".join(cells) + f" | {promoted} |")
    return lines


def paired(
    before: Mapping[int, Mapping[str, Any]],
    after: Mapping[int, Mapping[str, Any]],
    field: str,
    labelled: int,
    bar: float | None,
) -> list[str]:
    """The right rate at `labelled`, order by order, and the paired difference."""
    rows = []
    for seed in sorted(set(before) & set(after)):
        b, a = point(before[seed], labelled), point(after[seed], labelled)
        if b is not None and a is not None:
            rows.append((seed, b["fields"][field]["right_rate"], a["fields"][field]["right_rate"]))
    if not rows:
        return [f"no order replayed on both sides reached {labelled} labels"]
    _, b_rate, a_rate = (np.array(column) for column in zip(*rows, strict=True))
    diff = a_rate - b_rate
    se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    lines = [
        f"right rate at {labelled} labels, {len(diff)} orders ({field}): before "
        f"{b_rate.mean():.3f}, after {a_rate.mean():.3f}, difference {diff.mean():+.3f} "
        f"+- {se:.3f} (SE), better on {(diff > 0).sum()}, worse on {(diff < 0).sum()}",
    ]
    if bar is not None:
        lines.append(
            f"bar {bar:.3f} (frozen, every label, leave-one-out): reached by "
            f"{(b_rate >= bar).sum()} before, {(a_rate >= bar).sum()} after"
        )
    lines.append("order: " + ", ".join(f"{s} {b:.3f}→{a:.3f}" for s, b, a in rows))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--after", type=Path, nargs="+", required=True, help="report.json files")
    parser.add_argument("--before", type=Path, nargs="*", default=[], help="report.json files")
    parser.add_argument("--field", required=True)
    parser.add_argument("--at", type=int, default=200, help="labels for the paired comparison")
    args = parser.parse_args(argv)
    after, bars = sessions(args.after)
    print("after:\n" + "\n".join(curve_table(after, args.field)))
    if args.before:
        before, before_bars = sessions(args.before)
        print("\nbefore:\n" + "\n".join(curve_table(before, args.field)))
        bar = bars.get(args.field, before_bars.get(args.field))
        print("\n" + "\n".join(paired(before, after, args.field, args.at, bar)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
