"""Choose the near-duplicate threshold on data, and measure what near-duplicates do.

    python -m workers.review.duplicates_bench --images ../shared/data/busi \
        --labels ../shared/data/busi/labels.csv --field finding [--sheet pairs.png]

Prints (1) the histogram of cosine similarities between each image and its 10 nearest others
(near-duplicates form a separate high mode; the threshold goes into the valley before it),
(2) pairs and images at candidate thresholds, (3) what cleanlab's Datalab near-duplicate
check flags on the same kNN graph at its default setting, and (4) the headline evaluation
metrics with and without excluding near-duplicates from each query's neighbours. With
`--sheet`, a contact sheet of random pairs per similarity band, to look at the pairs just
above and below the threshold.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from workers.evaluation.metrics import leave_one_out_neighbours

from .duplicates import DEFAULT_THRESHOLD, near_duplicate_pairs

CANDIDATES = (0.90, 0.91, 0.92, 0.93, 0.94, 0.95, 0.97, 0.99)


def histogram(vectors: np.ndarray, k: int = 10, low: float = 0.80) -> list[tuple[float, int]]:
    """(bin start, pairs) of the distinct top-k pairs with cosine ≥ low, in 0.01 bins."""
    sims = np.array([s for _, _, s in near_duplicate_pairs(vectors, low, k)])
    edges = np.round(np.arange(low, 1.0 + 1e-9, 0.01), 2)
    counts, _ = np.histogram(np.minimum(sims, 1.0), bins=edges)
    return list(zip(edges[:-1].tolist(), counts.tolist(), strict=True))


def cleanlab_near_duplicates(vectors: np.ndarray, k: int = 10) -> dict[str, Any]:
    """cleanlab's near-duplicate rule at its default (Datalab's NearDuplicateIssueManager,
    threshold 0.13 × the median nearest-neighbour distance) on our exact kNN graph, Euclidean
    distances of unit vectors, sqrt(2 - 2 cos), as Datalab computes them. Datalab itself needs
    the `datasets` package (cleanlab[datalab]); its rule is called directly instead."""
    from cleanlab.datalab.internal.issue_manager.duplicate import NearDuplicateIssueManager
    from scipy.sparse import csr_matrix

    indices, sims = leave_one_out_neighbours(vectors, k)
    n = len(vectors)
    distances = np.sqrt(np.clip(2.0 - 2.0 * sims.astype(np.float64), 0.0, None))
    graph = csr_matrix((distances.ravel(), indices.ravel(), np.arange(0, n * k + 1, k)), (n, n))
    threshold = 0.13  # NearDuplicateIssueManager's default
    median = float(np.median(distances[:, 0]))
    sets = NearDuplicateIssueManager._neighbors_within_radius(graph, threshold, median)
    radius = threshold * median
    return {
        "flagged_images": sum(len(members) > 0 for members in sets),
        "relative_threshold": threshold,
        "median_nn_distance": median,
        "radius": radius,
        "cosine_equivalent": 1.0 - radius**2 / 2.0,
    }


def metric_shift(
    vectors: np.ndarray, labels: Sequence[str], threshold: float, k: int = 10
) -> dict[str, dict[str, float]]:
    """Headline metrics of `evaluate` with all neighbours and with near-duplicates excluded."""
    from echolabel.settings import Settings
    from workers.evaluation.report import evaluate_vectors

    settings = Settings.from_env()  # the vote settings /predict uses
    out = {}
    for view, excluded in (("all neighbours", None), ("near-duplicates excluded", threshold)):
        field = evaluate_vectors(
            vectors,
            {"label": list(labels)},
            k=k,
            min_neighbours=settings.min_neighbours,
            min_score=settings.min_score,
            near_duplicate_threshold=excluded,
        )["fields"]["label"]
        out[view] = {
            "same_in_top10": field["weighted_same_in_top10"],
            "p_at_1_micro": field["precision_at_k"]["micro"]["1"],
            "p_at_10_micro": field["precision_at_k"]["micro"]["10"],
            "vote_accuracy": field["vote"]["accuracy"],
            "coverage": field["vote"]["coverage"],
        }
    return out


def contact_sheet(
    vectors: np.ndarray, paths: Sequence[Path], out: Path, bands: Sequence[float], seed: int = 0
) -> None:
    """Four random pairs per similarity band [b, b + 0.01), side by side, labelled."""
    from PIL import Image, ImageDraw

    pairs = near_duplicate_pairs(vectors, min(bands))
    rng = np.random.default_rng(seed)
    size = 110
    sheet = Image.new("RGB", (size * 8 + 45, (size + 20) * len(bands)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, low in enumerate(bands):
        band = [p for p in pairs if low <= p[2] < low + 0.01]
        for col, pick in enumerate(rng.permutation(len(band))[:4]):
            i, j, sim = band[pick]
            x, y = col * (2 * size + 15), row * (size + 20)
            for offset, index in ((0, i), (size, j)):
                image = Image.open(paths[index]).convert("RGB").resize((size, size))
                sheet.paste(image, (x + offset, y + 20))
            draw.text((x + 2, y + 4), f"{sim:.3f} {paths[i].stem} {paths[j].stem}", fill="black")
    sheet.save(out)


def main(argv: Sequence[str] | None = None) -> int:
    from .vectors import add_folder_arguments, labelled_folder_vectors

    parser = argparse.ArgumentParser(
        prog="python -m workers.review.duplicates_bench", description=__doc__
    )
    add_folder_arguments(parser)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--sheet", type=Path, help="write a contact sheet of pairs (PNG)")
    args = parser.parse_args(argv)
    vectors, kept, _ = labelled_folder_vectors(args)
    labels = [i.labels[args.field] for i in kept]
    print(f"{len(kept)} images, {args.encoder}; distinct top-10 pairs by cosine similarity:")
    print("| cosine | pairs |\n|---|---|")
    for start, count in histogram(vectors):
        print(f"| {start:.2f}–{start + 0.01:.2f} | {count} |")
    print("\n| threshold | pairs | images in a pair | pairs with different labels |")
    print("|---|---|---|---|")
    for threshold in sorted({*CANDIDATES, args.threshold}):
        pairs = near_duplicate_pairs(vectors, threshold)
        images = {i for p in pairs for i in p[:2]}
        conflicts = sum(labels[i] != labels[j] for i, j, _ in pairs)
        print(f"| {threshold:.2f} | {len(pairs)} | {len(images)} | {conflicts} |")
    found = cleanlab_near_duplicates(vectors)
    print(
        f"\ncleanlab near_duplicate rule (default, our kNN graph): {found['flagged_images']} "
        f"images flagged; radius {found['relative_threshold']} × median NN distance "
        f"{found['median_nn_distance']:.3f} = {found['radius']:.4f}, i.e. cosine ≥ "
        f"{found['cosine_equivalent']:.4f}"
    )
    print(f"\nheadline metrics ({args.field}), near-duplicates at cosine ≥ {args.threshold}:")
    print("| neighbours | same label in top 10 | P@1 | P@10 | vote accuracy | coverage |")
    print("|---|---|---|---|---|---|")
    for view, m in metric_shift(vectors, labels, args.threshold).items():
        print(
            f"| {view} | {m['same_in_top10']:.2f} | {m['p_at_1_micro']:.3f} | "
            f"{m['p_at_10_micro']:.3f} | {m['vote_accuracy']:.3f} | {m['coverage']:.2f} |"
        )
    if args.sheet:
        contact_sheet(vectors, [i.path for i in kept], args.sheet, bands=CANDIDATES[:-1])
        print(f"\n{args.sheet}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
