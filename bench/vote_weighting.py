"""How the vote weighs its neighbours, scored for any encoder on validation only.

The training rows (`split` = `train`) are dealt into stratified folds as
`bench.recipe_validation` deals them; each fold is voted by its top-k nearest images among the
other folds, with the product's vote (`echolabel.vote`, the settings' top-k, minimum neighbours
and minimum share), an abstention a miss. Each weighting is scored on the same embeddings:
the cosine similarity s (the vote until 2026-12-07), s with the class prior divided out, and
exp((s - s_max) / temperature) for each `--temperature` (the product's is 0.03). With
`--centre`, each weighting is scored a second time with the similarities taken after the
labelled folds' mean vector is subtracted (label-free centring; near-duplicates are still
those of the encoder's own similarity); with `--centre-from N`, the centre is the mean of N
of the labelled folds' images drawn at random (`--centre-draws` draws, each scored), to see
how few images a centre needs.

BUSI has no patient ids, and a quarter of its training images have a neighbour above 0.96
similarity: mostly the same lesion again. `--without-above 0.95` drops such neighbours from
every vote, standing in for a project whose other images of a patient are not labelled yet.
Test rows are never read.

    python -m bench.vote_weighting --images ../shared/data/busi \\
        --labels ../shared/data/busi/labels.csv --field finding --encoder efficientnet_lite0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bench.recipe_validation import machine, outer_split, score_votes
from echolabel.core.runtime import Runtime
from echolabel.encoders import load_encoder
from echolabel.settings import Settings
from workers.training.sources import folder_samples


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--field", required=True)
    parser.add_argument("--encoder", help="encoder name (default: the settings')")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, action="append", default=[])
    parser.add_argument(
        "--without-above",
        type=float,
        help="leave out neighbours at or above this cosine similarity (near-duplicates)",
    )
    parser.add_argument(
        "--centre",
        action="store_true",
        help="also score every weighting with the labelled rows' mean subtracted",
    )
    parser.add_argument(
        "--centre-from", type=int, help="with --centre: fit each centre on N random images"
    )
    parser.add_argument("--centre-draws", type=int, default=5)
    parser.add_argument("--out", type=Path, help="append one JSON line per weighting")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    name = args.encoder or settings.encoder
    root = args.images.resolve()
    samples, _ = folder_samples(root, args.labels, [args.field], split_column="split")
    started = time.monotonic()
    with Runtime.build(dataclasses.replace(settings, local_files_root=root)) as runtime:
        encoder = load_encoder(
            name, weights_dir=settings.weights_dir, encoders_dir=settings.encoders_dir
        )
        pictures = [runtime.fetcher.load(s.ref, min_side=encoder.input_side) for s in samples]
        vectors = torch.from_numpy(np.asarray(encoder.embed(pictures), dtype=np.float32))
    vectors = torch.nn.functional.normalize(vectors, dim=1)
    embed_s = time.monotonic() - started
    # How bunched the similarities are: each image's nearest and 10th nearest other image.
    others = (vectors @ vectors.T).fill_diagonal_(-2.0)
    nearest = others.topk(10, dim=1).values
    for rank, column in (("nearest", 0), ("10th nearest", 9)):
        quartiles = np.quantile(nearest[:, column].numpy(), [0.25, 0.5, 0.75])
        print(f"{name}\t{rank} other image's similarity, quartiles: {np.round(quartiles, 3)}")
    position = {id(s): i for i, s in enumerate(samples)}
    labels = [str(s.labels[args.field]) for s in samples]
    classes = sorted(set(labels))
    weightings = [("similarity", 0.0, 0.0), ("similarity, prior^1", 1.0, 0.0)] + [
        (f"exp((s-s_max)/{t:g})", 0.0, t)
        for t in (args.temperature or [0.2, 0.1, 0.05, 0.03, 0.02, 0.01])
    ]
    # (labelled, voted) row numbers of each fold, dealt once for every weighting.
    folds = [
        tuple([position[id(s)] for s in part] for part in parts)
        for parts in (
            outer_split(samples, args.field, args.folds, fold, args.split_seed)
            for fold in range(args.folds)
        )
    ]
    # (centred, draw): draw None centres on every labelled image.
    draws: list[int | None] = list(range(args.centre_draws)) if args.centre_from else [None]
    centrings = [(False, None)] + ([(True, d) for d in draws] if args.centre else [])
    for (label, power, temperature), (centre, draw) in (
        (weighting, centring) for centring in centrings for weighting in weightings
    ):
        hits = {c: 0 for c in classes}
        voted = 0
        for known, asked in folds:
            centre_on = None
            if draw is not None:
                picked = np.random.default_rng(draw).choice(known, args.centre_from, replace=False)
                centre_on = vectors[picked]
            scores = score_votes(
                vectors[known],
                [labels[i] for i in known],
                vectors[asked],
                [labels[i] for i in asked],
                classes,
                args.field,
                settings,
                prior_power=power,
                temperature=temperature,
                exclude_above=args.without_above,
                centre=centre,
                centre_on=centre_on,
            )
            voted += round(scores["coverage"] * scores["images"])
            for cls, frac in scores["recall"].items():
                hits[cls] += int(frac.split("/")[0])
        row = {
            "encoder": name,
            "weighting": label,
            "accuracy": round(sum(hits.values()) / len(samples), 4),
            "coverage": round(voted / len(samples), 4),
            "recall": {c: f"{hits[c]}/{labels.count(c)}" for c in classes},
            "images": len(samples),
            "folds": args.folds,
            "without_above": args.without_above,
            "centred": centre,
            "centre_from": args.centre_from if draw is not None else None,
            "centre_draw": draw,
            "embed_s": round(embed_s, 1),
            "load_avg": [round(x, 2) for x in os.getloadavg()],
            "machine": machine(),
        }
        how = "as is" if not centre else "centred"
        if draw is not None:
            how += f" on {args.centre_from}, draw {draw}"
        print(
            f"{name}\twithout above {args.without_above}\t{how}\t{label:<22}"
            f"\tacc {row['accuracy']:.3f}\tcov {row['coverage']:.2f}\trecall {row['recall']}"
        )
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
