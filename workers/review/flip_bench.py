"""Measure label QA on a labelled folder with a seeded random fraction of labels flipped.

    python -m workers.review.flip_bench --images ../shared/data/busi \
        --labels ../shared/data/busi/labels.csv --field finding

For each flip rate and seed, that share of the labels is changed to another class at random;
label QA ranks the noisy set; the top N (N = number flipped, and 2N) are compared with the
flipped set (precision, recall) next to a random ranking of the same run, and cleanlab's own
`find_label_issues` verdicts are scored too. Vectors are embedded once and cached (`--cache`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .label_issues import METHODS, rank_label_issues


def flip_labels(
    labels: Sequence[str], rate: float, rng: np.random.Generator
) -> tuple[list[str], np.ndarray]:
    """A copy with round(rate × n) labels changed to another class; (noisy, flipped mask)."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError("flipping needs at least two classes")
    n = len(labels)
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, size=round(rate * n), replace=False)] = True
    noisy = list(labels)
    for i in np.flatnonzero(flipped):
        others = [c for c in classes if c != labels[i]]
        noisy[i] = others[rng.integers(len(others))]
    return noisy, flipped


def precision_recall_at(ranking: Sequence[int], flipped: np.ndarray, n: int) -> tuple[float, float]:
    """Precision and recall of the first n of `ranking` (row indices) against `flipped`."""
    hits = int(flipped[np.asarray(ranking[:n], dtype=np.int64)].sum())
    return hits / n, hits / int(flipped.sum())


def run(
    vectors: np.ndarray,
    labels: Sequence[str],
    *,
    rates: Sequence[float] = (0.05, 0.10, 0.20),
    seeds: Sequence[int] = (0, 1, 2),
    k: int = 10,
    methods: Sequence[str] = METHODS,
) -> list[dict[str, Any]]:
    """One row per rate and method (means over seeds) plus a `random` row per rate."""
    rows: list[dict[str, Any]] = []
    for rate in rates:
        measured: dict[str, list[dict[str, float]]] = {m: [] for m in (*methods, "random")}
        for seed in seeds:
            rng = np.random.default_rng([seed, round(rate * 1000)])
            noisy, flipped = flip_labels(labels, rate, rng)
            n = int(flipped.sum())
            for method in methods:
                ranked = rank_label_issues(vectors, noisy, k=k, method=method)
                ranking = [row["index"] for row in ranked["rows"]]
                flags = np.array([row["index"] for row in ranked["rows"] if row["flagged"]])
                hits = int(flipped[flags].sum()) if len(flags) else 0
                measured[method].append(
                    _scores(ranking, flipped, n)
                    | {
                        "flagged": len(flags),
                        "flagged_precision": hits / len(flags) if len(flags) else 0.0,
                        "flagged_recall": hits / n,
                    }
                )
            measured["random"].append(_scores(list(rng.permutation(len(labels))), flipped, n))
        for method, results in measured.items():
            rows.append(
                {
                    "rate": rate,
                    "flipped": round(rate * len(labels)),
                    "method": method,
                    "seeds": len(seeds),
                    **{key: float(np.mean([r[key] for r in results])) for key in results[0]},
                    **{
                        f"{key}_sd": float(np.std([r[key] for r in results]))
                        for key in ("precision_at_n", "recall_at_2n")
                    },
                }
            )
    return rows


def _scores(ranking: Sequence[int], flipped: np.ndarray, n: int) -> dict[str, float]:
    p_n, r_n = precision_recall_at(ranking, flipped, n)
    p_2n, r_2n = precision_recall_at(ranking, flipped, 2 * n)
    return {
        "precision_at_n": p_n,
        "recall_at_n": r_n,
        "precision_at_2n": p_2n,
        "recall_at_2n": r_2n,
    }


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| flipped | ranking | P@N (= R@N) | P@2N | R@2N | cleanlab flags: count / precision / "
        "recall |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        flags = (
            f"{row['flagged']:.0f} / {row['flagged_precision']:.2f} / {row['flagged_recall']:.2f}"
            if "flagged" in row
            else "–"
        )
        lines.append(
            f"| {row['rate']:.0%} (N = {row['flipped']}) | {row['method']} | "
            f"{row['precision_at_n']:.2f} ± {row['precision_at_n_sd']:.2f} | "
            f"{row['precision_at_2n']:.2f} | {row['recall_at_2n']:.2f} | {flags} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from .vectors import add_folder_arguments, labelled_folder_vectors

    parser = argparse.ArgumentParser(
        prog="python -m workers.review.flip_bench", description=__doc__
    )
    add_folder_arguments(parser)
    parser.add_argument("--rates", default="0.05,0.1,0.2")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    vectors, kept, failed = labelled_folder_vectors(args)
    rows = run(
        vectors,
        [i.labels[args.field] for i in kept],
        rates=[float(r) for r in args.rates.split(",")],
        seeds=[int(s) for s in args.seeds.split(",")],
        k=args.k,
    )
    print(f"{len(kept)} images ({len(failed)} unreadable), {args.encoder}, k = {args.k}")
    print(markdown(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
