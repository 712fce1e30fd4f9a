"""Cold start: which order of the first 10–200 labels makes suggestions pay off soonest?

    python -m bench.cold_start --images ../shared/data/busi \\
        --labels ../shared/data/busi/labels.csv --field finding --split-column split

Replays annotation sessions (`workers.evaluation.learning_curve`) on the rows of one split
(`--split`, default `train`: decisions are made there, never on the test rows) in three orders:
random, uncertain-first (the prediction score Label Studio sorts by) and diverse-first (the
k-center order `echolabel diverse-first` writes into Label Studio). After each batch, every task
not labelled yet is voted by its 10 nearest labelled tasks with the backend's abstain rules
(ECHOLABEL_MIN_NEIGHBOURS, ECHOLABEL_MIN_SCORE), and the table gives, over seeds:

- accuracy of the suggestions made, and coverage (the share of tasks suggested);
- right: the share of the remaining tasks that got a right suggestion (abstentions count as
  misses: accuracy × coverage), the one number the orders' trade-off comes down to;
- classes: how many of the field's classes are among the labelled tasks;

and, seed by seed, diverse-first's `right` minus each other order's (mean ± sd of the
difference, and in how many seeds diverse-first is ahead).

Vectors are embedded once per encoder and cached (`--cache`). Prints a Markdown table headed by
the machine and date; `--out` also writes the whole curve as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from echolabel.folders import read_folder
from echolabel.settings import Settings
from workers.evaluation.learning_curve import ORDERS, learning_curve
from workers.review.vectors import folder_vectors

from .report import describe, load_average, machine

TITLES = {
    "random": "random",
    "uncertain_first": "uncertain-first",
    "diverse_first": "diverse-first",
}


def sessions(
    vectors: np.ndarray,
    labels: Sequence[str],
    field: str,
    *,
    seeds: Sequence[int],
    sizes: Sequence[int],
    subsample: float | None = None,
    **vote: Any,
) -> dict[str, Any]:
    """`learning_curve` over every order; with `subsample`, seed s replays its own random
    share of the rows (drawn with seed s), so that every order's spread includes the data's."""
    if not subsample:
        return learning_curve(vectors, {field: labels}, seeds=seeds, sizes=sizes, **vote)
    runs: dict[str, list[Any]] = {order: [] for order in ORDERS}
    for seed in seeds:
        rows = np.random.default_rng([seed, 7]).permutation(len(labels))
        rows = np.sort(rows[: round(subsample * len(labels))])
        curve = learning_curve(
            vectors[rows], {field: [labels[r] for r in rows]}, seeds=[seed], sizes=sizes, **vote
        )
        for order in ORDERS:
            runs[order] += curve["runs"][order]
    return {"sizes": list(sizes), "seeds": list(seeds), "subsample": subsample, "runs": runs}


def summarise(curve: Mapping[str, Any], field: str) -> list[dict[str, Any]]:
    """One row per (order, labelled count): mean and sd over seeds of accuracy, coverage,
    right (accuracy × coverage, abstentions as misses) and classes labelled."""
    sizes = curve["sizes"]
    rows = []
    for order, sessions in curve["runs"].items():
        for p, size in enumerate(sizes):
            measured = [session[p]["fields"][field] for session in sessions]
            right = [(m["accuracy"] or 0.0) * m["coverage"] for m in measured]
            accuracy = [m["accuracy"] for m in measured if m["accuracy"] is not None]
            rows.append(
                {
                    "order": order,
                    "labelled": size,
                    "accuracy": _stats(accuracy),
                    "coverage": _stats([m["coverage"] for m in measured]),
                    "right": _stats(right),
                    "classes": _stats([m["classes_labelled"] for m in measured]),
                }
            )
    return rows


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "sd": None}
    return {"mean": float(np.mean(values)), "sd": float(np.std(values))}


def markdown(rows: Sequence[Mapping[str, Any]], orders: Sequence[str]) -> str:
    by = {(r["order"], r["labelled"]): r for r in rows}
    sizes = sorted({r["labelled"] for r in rows})
    head = "| labelled | " + " | ".join(
        f"{TITLES[o]}: accuracy | coverage | right | classes" for o in orders
    )
    lines = [head + " |", "|---" * (1 + 4 * len(orders)) + "|"]
    for size in sizes:
        cells = []
        for order in orders:
            row = by[(order, size)]
            cells += [
                _pm(row["accuracy"]),
                _pm(row["coverage"]),
                _pm(row["right"]),
                f"{row['classes']['mean']:.1f}",
            ]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(curve: Mapping[str, Any], field: str, order: str = "diverse_first") -> str:
    """`order` against each other order, seed by seed (the same first batch and rows): the
    mean ± sd of the difference in `right`, and in how many seeds `order` is ahead."""
    others = [o for o in curve["runs"] if o != order]
    head = "| labelled | " + " | ".join(
        f"right: {TITLES[order]} − {TITLES[o]} | ahead in" for o in others
    )
    lines = [head + " |", "|---" * (1 + 2 * len(others)) + "|"]

    def right(session: Sequence[Mapping[str, Any]], p: int) -> float:
        measured = session[p]["fields"][field]
        return (measured["accuracy"] or 0.0) * measured["coverage"]

    for p, size in enumerate(curve["sizes"]):
        cells = []
        for other in others:
            pairs = zip(curve["runs"][order], curve["runs"][other], strict=True)
            diff = np.array([right(a, p) - right(b, p) for a, b in pairs])
            cells += [f"{diff.mean():+.2f} ± {diff.std():.2f}", f"{(diff > 0).sum()}/{len(diff)}"]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(stats: Mapping[str, float | None]) -> str:
    if stats["mean"] is None:
        return "–"
    return f"{stats['mean']:.2f} ± {stats['sd']:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--field", required=True)
    parser.add_argument("--split-column", help="CSV column naming each row's split")
    parser.add_argument("--split", default="train", help="the split the sessions replay")
    parser.add_argument("--encoder", default="efficientnet_lite0")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/echolabel-review/cache"))
    parser.add_argument("--sizes", default="10,20,50,100,200")
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0 … N-1")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument(
        "--subsample",
        type=float,
        help="each seed replays a random share of the rows (e.g. 0.8): diverse-first, "
        "deterministic on one set, then varies with the data like the other orders",
    )
    parser.add_argument("--out", type=Path, help="write the curve and rows as JSON here")
    args = parser.parse_args(argv)

    load_at_start = load_average()
    started = time.perf_counter()
    columns = (args.field, *([args.split_column] if args.split_column else []))
    items = [
        i
        for i in read_folder(args.images, args.labels, fields=columns)
        if args.field in i.labels
        and (not args.split_column or i.labels.get(args.split_column) == args.split)
    ]
    settings = Settings.from_env()
    vectors, kept, failed = folder_vectors(
        items, args.encoder, settings, root=args.images, cache_dir=args.cache
    )
    labels = [i.labels[args.field] for i in kept]
    curve = sessions(
        vectors,
        labels,
        args.field,
        seeds=range(args.seeds),
        sizes=[int(s) for s in args.sizes.split(",")],
        subsample=args.subsample,
        k=args.k,
        min_neighbours=settings.min_neighbours,
        min_score=settings.min_score,
    )
    rows = summarise(curve, args.field)
    info = machine()
    info["load_average_1m_at_start"] = load_at_start
    split = f"split {args.split!r} of " if args.split_column else ""
    print(
        f"{time.strftime('%Y-%m-%d')}, {describe(info)}; "
        f"{len(kept)} images ({split}{args.labels}, {len(failed)} unreadable), "
        f"{args.encoder}, k = {args.k}, min_neighbours = {settings.min_neighbours}, "
        f"min_score = {settings.min_score}, {args.seeds} seeds"
        + (f", each on a random {args.subsample:.0%} of the rows" if args.subsample else "")
        + ", "
        f"{time.perf_counter() - started:.0f} s\n"
    )
    print(markdown(rows, ORDERS))
    print()
    print(paired(curve, args.field))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": info, "rows": rows, "curve": curve}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
