"""How often each way of judging a challenger promotes one that is better, on validation only.

At a given number of labels (`--labelled`, 200 by default), the loop's round is replayed on
BUSI's `train` rows: for each of `--draws` random sets of labelled images drawn from the
training part of each of 4 stratified folds (`bench.recipe_validation`'s split), the round's
own held-out share is set aside (`challenge_split`, the backend's hash), a challenger is
trained on the rest with the loop's recipe (`TrainOptions.for_retraining`), and challenger
and champion (the pretrained encoder centred on every image, as the backend centres it) are
compared on the held-out images exactly as the round compares them (`held_out_scores`,
`compare`), under every judge
(`RetrainPolicy.judge_by`). The truth is the fold held out of the draw: its images voted by
the labelled ones with each encoder, abstentions as misses. Test rows are never read.

    python -m bench.judge_power --images ../shared/data/busi \\
        --labels ../shared/data/busi/labels.csv --field finding --draws 3

One line per (draw, fold) and a summary: the rounds each judge promotes, and how many of them
(and of all) had the better challenger on the validation fold.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.recipe_validation import machine, outer_split, score_votes
from echolabel.core.runtime import Runtime
from echolabel.encoders import load_encoder
from echolabel.encoders.centred import centre_rows, fit_centre
from echolabel.encoders.trained import load_trained
from echolabel.settings import Settings
from workers.training import Sample, TrainOptions, train_encoder
from workers.training.samples import TrainingRefused
from workers.training.selection import (
    JUDGES,
    RetrainPolicy,
    challenge_split,
    compare,
    held_out_scores,
)
from workers.training.sources import folder_samples


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--field", required=True)
    parser.add_argument("--labelled", type=int, default=200, help="labelled images per round")
    parser.add_argument("--draws", type=int, default=3, help="random labelled sets per fold")
    parser.add_argument("--first-draw", type=int, default=0)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--out", type=Path, help="append one JSON line per (draw, fold)")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    policy = RetrainPolicy.from_settings(settings)
    root = args.images.resolve()
    samples, _ = folder_samples(root, args.labels, [args.field], split_column="split")
    position = {s.id: i for i, s in enumerate(samples)}
    truth = [str(s.labels[args.field]) for s in samples]
    fields = [args.field]
    cases = []
    with (
        Runtime.build(dataclasses.replace(settings, local_files_root=root)) as runtime,
        tempfile.TemporaryDirectory() as scratch,
    ):
        load = runtime.fetcher.load
        pretrained = load_encoder(
            settings.encoder, weights_dir=settings.weights_dir, encoders_dir=settings.encoders_dir
        )
        base = pretrained.embed([load(s.ref, min_side=pretrained.input_side) for s in samples])
        champion_vectors = centre_rows(base, fit_centre(base))
        for draw in range(args.first_draw, args.first_draw + args.draws):
            for fold in range(args.folds):
                training_part, validation = outer_split(samples, args.field, args.folds, fold, 0)
                rng = np.random.default_rng(1000 + draw)
                order = rng.permutation(len(training_part))[: args.labelled]
                labelled = [training_part[i] for i in order]
                started = time.monotonic()
                try:
                    train, held = challenge_split(labelled, fields, policy)
                    summary = train_encoder(
                        train,
                        fields,
                        fetcher=runtime.fetcher,
                        encoders_dir=Path(scratch),
                        name=f"judge-d{draw}-f{fold}",
                        options=TrainOptions.for_retraining(settings),
                        source={"kind": "judge-power"},
                    )
                except TrainingRefused as exc:  # as the round refuses: nothing to judge
                    print(f"draw {draw} fold {fold}\trefused: {str(exc).splitlines()[0]}")
                    continue
                train_s = time.monotonic() - started
                challenger = load_trained(Path(summary["path"]))
                challenger_vectors = challenger.embed(
                    [load(s.ref, min_side=challenger.input_side) for s in samples]
                )
                case = judge_case(
                    labelled,
                    {s.id for s in held},
                    validation,
                    position,
                    truth,
                    {"champion": champion_vectors, "challenger": challenger_vectors},
                    fields,
                    policy,
                    settings,
                )
                case.update(
                    draw=draw,
                    fold=fold,
                    labelled=len(labelled),
                    trained_on=len(train),
                    train_s=round(train_s, 1),
                    load_avg=[round(x, 2) for x in os.getloadavg()],
                    machine=machine(),
                    champion=f"{settings.encoder}, centred",
                )
                cases.append(case)
                print_case(case)
                if args.out:
                    with open(args.out, "a") as handle:
                        handle.write(json.dumps(case) + "\n")
    print(summarise(cases))
    return 0


def judge_case(
    labelled: Sequence[Sample],
    held: set[str],
    validation: Sequence[Sample],
    position: dict[str, int],
    truth: Sequence[str],
    vectors: dict[str, np.ndarray],
    fields: Sequence[str],
    policy: RetrainPolicy,
    settings: Settings,
) -> dict[str, Any]:
    """Both encoders judged as the round judges them, under every judge; and right on the
    validation fold, voted by the labelled images."""
    rows = [position[s.id] for s in labelled]
    queries = [i for i, s in enumerate(labelled) if s.id in held]
    scores = {
        name: held_out_scores(v[rows], labelled, fields, queries, policy)
        for name, v in vectors.items()
    }
    groups = [labelled[q].group for q in queries]
    comparison = compare(scores["champion"], scores["challenger"], groups, policy)
    # One bootstrap holds both margins; each judge only reads them differently.
    verdicts = {
        judge: dataclasses.replace(comparison, judge_by=judge).challenger_wins for judge in JUDGES
    }
    asked = [position[s.id] for s in validation]
    classes = sorted({truth[i] for i in rows + asked})
    right = {}
    for name, v in vectors.items():
        unit = torch.from_numpy(np.asarray(v, dtype=np.float32))
        scored = score_votes(
            unit[rows],
            [truth[i] for i in rows],
            unit[asked],
            [truth[i] for i in asked],
            classes,
            fields[0],
            settings,
        )
        right[name] = round(scored["accuracy"] * scored["images"])
    return {
        "held_out": len(queries),
        "comparison": comparison.as_dict(),
        "promoted": verdicts,
        "validation_images": len(asked),
        "validation_right": right,
    }


def print_case(case: dict[str, Any]) -> None:
    c = case["comparison"]
    print(
        f"draw {case['draw']} fold {case['fold']}\theld out {case['held_out']}"
        f"\tvote margin {c['margin']:+.3f} [{c['interval'][0]:+.3f}, {c['interval'][1]:+.3f}]"
        f"\tlabel match margin {c['label_match_margin']:+.3f} "
        f"[{c['label_match_interval'][0]:+.3f}, {c['label_match_interval'][1]:+.3f}]"
        f"\tpromoted {case['promoted']}"
        f"\tvalidation right champion {case['validation_right']['champion']} challenger "
        f"{case['validation_right']['challenger']} of {case['validation_images']}"
        f"\ttrain {case['train_s']:.0f} s"
    )


def summarise(cases: Sequence[dict[str, Any]]) -> str:
    better = [
        c["validation_right"]["challenger"] > c["validation_right"]["champion"] for c in cases
    ]
    gain = [c["validation_right"]["challenger"] - c["validation_right"]["champion"] for c in cases]
    lines = [
        f"{len(cases)} rounds; the challenger was better on the validation fold in "
        f"{sum(better)}, by {np.mean(gain):+.1f} images on average "
        f"(from {min(gain):+d} to {max(gain):+d})"
    ]
    for judge in JUDGES:
        promoted = [c["promoted"][judge] for c in cases]
        rightly = sum(p and b for p, b in zip(promoted, better, strict=True))
        lines.append(
            f"judge {judge}: promotes {sum(promoted)} of {len(cases)}; "
            f"{rightly} of them better on validation, {sum(promoted) - rightly} not"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
