"""Choose a training recipe on validation only: train on part of the training rows, score the
product's vote on the rest.

The training rows (`--split-column` = `train`) are split into folds, stratified by the field
with a fixed seed; fold `--fold` is the validation part and is never trained on (not even for
early stopping: the trainer splits its own early-stopping share off the other folds). Test
rows are never read. The trained encoder then embeds every training-row image, and each
validation image is voted by its top-k nearest labelled images of the training part with the
vote /predict uses (`echolabel.vote`, the settings' top-k, minimum neighbours and minimum
share); an abstention counts as a miss. Each trained encoder is scored with and without:

- `tta`: embedding with test-time mirror averaging (mean of the image's and its mirror's
  pooled features);
- `vote`: the neighbours' labels alone (today's product), the neighbours' shares averaged
  with the trained head's class probabilities (`--head-weight`), and the weightings of the
  neighbours the product's was chosen against (similarity, with or without the class prior
  divided out, other temperatures).

`--encoders-dir` keeps the trained encoders; `--trained DIR` scores a kept one again (on the
fold it was trained for) without training.

    python -m bench.recipe_validation --images ../shared/data/busi \\
        --labels ../shared/data/busi/labels.csv --field finding \\
        --set start=efficientnet_lite0 --set input_size=160 --out recipe.jsonl

One JSON line per (encoder, tta, vote) goes to `--out`, with the machine, the load average
around the training, and the training time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from echolabel.core.runtime import Runtime
from echolabel.encoders.trained import TrainedEncoder, load_trained
from echolabel.encoders.trained_files import WEIGHTS_FILE, read_config
from echolabel.settings import Settings
from echolabel.vote import TEMPERATURE
from workers.training import Sample, TrainOptions, train_encoder
from workers.training.sources import folder_samples
from workers.training.validation import neighbour_votes


def outer_split(
    samples: Sequence[Sample], field: str, folds: int, fold: int, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """(training part, validation part): fold `fold` of `folds`, stratified by `field`.

    Each class is shuffled with the seed and dealt round-robin into the folds, so every fold
    holds each class's share to within one image."""
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be 0..{folds - 1}, got {fold}")
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    for cls in sorted({str(s.labels.get(field)) for s in samples}):
        members = sorted(
            (s for s in samples if str(s.labels.get(field)) == cls), key=lambda s: s.id
        )
        order = rng.permutation(len(members))
        held |= {members[i].id for rank, i in enumerate(order) if rank % folds == fold}
    return [s for s in samples if s.id not in held], [s for s in samples if s.id in held]


def parse_options(pairs: Sequence[str]) -> TrainOptions:
    """`key=value` pairs onto the default TrainOptions, each converted to the field's type."""
    base = TrainOptions()
    types = {f.name: type(getattr(base, f.name)) for f in dataclasses.fields(base)}
    chosen: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in types:
            raise ValueError(f"--set {pair!r}: expected key=value with key one of {sorted(types)}")
        kind = types[key]
        chosen[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return dataclasses.replace(base, **chosen)


@torch.inference_mode()
def pooled_features(
    encoder: TrainedEncoder, images: Sequence[Any], batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain, mirrored) pooled features of every image, through the encoder's own
    preprocessing and model: the encoder embeds normalize(plain), or with test-time mirror
    averaging normalize((plain + mirrored) / 2)."""
    plain, mirrored = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([encoder.preprocess(i) for i in images[start : start + batch_size]])
        plain.append(encoder.model(batch).float())
        mirrored.append(encoder.model(batch.flip(-1)).float())
    return torch.cat(plain), torch.cat(mirrored)


def head_probabilities(path: Path, features: torch.Tensor, index: int = 0) -> torch.Tensor:
    """Class probabilities of the trained head of field number `index` (softmax)."""
    tensors = load_file(str(path / WEIGHTS_FILE))
    weight, bias = tensors[f"heads.{index}.weight"], tensors[f"heads.{index}.bias"]
    return torch.softmax(features @ weight.T + bias, dim=1)


def score_votes(
    labelled: torch.Tensor,
    labelled_y: Sequence[str],
    queries: torch.Tensor,
    query_y: Sequence[str],
    classes: Sequence[str],
    field: str,
    settings: Settings,
    head: torch.Tensor | None = None,
    head_weight: float = 0.5,
    prior_power: float = 0.0,
    temperature: float = TEMPERATURE,
    exclude_above: float | None = None,
    centre: bool = False,
    centre_on: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Accuracy (abstentions as misses), coverage, accuracy where voted and per-class recall
    of the product's vote for every query among the labelled vectors (rows L2-normalised).

    With `head` ((queries, classes) probabilities), each class's score is the neighbours'
    share and the head's probability mixed by `head_weight`; the same abstention rules apply
    to the mixed score (support below the minimum, winner under the minimum share).

    With `prior_power` > 0, each class's weight is divided by its share of the labelled images
    to that power before the shares are taken (1: every class counts as if equally common),
    with the same abstention rules.

    `temperature` is how the vote weighs the neighbours (`echolabel.vote`; 0: their
    similarity). With `exclude_above`, labelled rows at or above that similarity to a query
    are not among its neighbours. With `centre`, the similarities are taken after the
    labelled rows' mean (or `centre_on`'s) is subtracted (`neighbour_votes`)."""
    votes = neighbour_votes(
        labelled,
        [{field: y} for y in labelled_y],
        queries,
        [field],
        top_k=settings.top_k,
        min_neighbours=settings.min_neighbours,
        min_score=settings.min_score,
        temperature=temperature,
        exclude_above=exclude_above,
        centre=centre,
        centre_on=centre_on,
    )
    prior = {cls: list(labelled_y).count(cls) / len(labelled_y) for cls in classes}
    outcome: list[str | None] = []
    for row, by_field in enumerate(votes):
        voted = by_field[field]
        if prior_power and voted.weights:
            corrected = {c: w / prior[c] ** prior_power for c, w in voted.weights.items()}
            winner = min(corrected, key=lambda cls: (-corrected[cls], cls))
            share = corrected[winner] / sum(corrected.values())
            ok = voted.support >= settings.min_neighbours and share >= settings.min_score
            outcome.append(winner if ok else None)
            continue
        if head is None:
            outcome.append(voted.label)
            continue
        mixed = {
            cls: (1 - head_weight) * voted.shares.get(cls, 0.0) + head_weight * float(head[row, c])
            for c, cls in enumerate(classes)
        }
        winner = min(mixed, key=lambda cls: (-mixed[cls], cls))
        ok = voted.support >= settings.min_neighbours and mixed[winner] >= settings.min_score
        outcome.append(winner if ok else None)
    truth = list(query_y)
    correct = [o == t for o, t in zip(outcome, truth, strict=True)]
    voted_count = sum(o is not None for o in outcome)
    return {
        "accuracy": round(float(np.mean(correct)), 4),
        "coverage": round(voted_count / len(truth), 4),
        "voted_accuracy": round(sum(correct) / voted_count, 4) if voted_count else None,
        "recall": {
            cls: f"{sum(c for c, t in zip(correct, truth, strict=True) if t == cls)}"
            f"/{truth.count(cls)}"
            for cls in classes
        },
        "min_recall": round(
            min(
                sum(c for c, t in zip(correct, truth, strict=True) if t == cls) / truth.count(cls)
                for cls in classes
                if truth.count(cls)
            ),
            4,
        ),
        "images": len(truth),
    }


def kept_summary(path: Path) -> dict[str, Any]:
    """What `train_encoder` returned for a kept encoder, read back from its report.json."""
    report = json.loads((path / "report.json").read_text())
    curves = report["curves"]
    best = report["validation"] or curves[-1]
    return {
        "path": str(path),
        "epochs_run": len(curves),
        "best_epoch": best["epoch"],
        "timing_s": report["timing_s"],
    }


def machine() -> dict[str, Any]:
    return {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run(
    images: Path,
    labels: Path,
    field: str,
    options: TrainOptions,
    *,
    folds: int,
    fold: int,
    split_seed: int,
    encoders_dir: Path,
    head_weight: float,
    settings: Settings,
    tag: str,
    trained: Path | None = None,
) -> list[dict[str, Any]]:
    """Train on the training part, score on the validation part; one result per scoring.
    With `trained` (an encoder this command trained and kept for the same fold), score it
    again without training."""
    root = images.resolve()
    samples, _ = folder_samples(root, labels, [field], split_column="split")
    train_part, validation = outer_split(samples, field, folds, fold, split_seed)
    fetch_settings = dataclasses.replace(settings, local_files_root=root)
    load_before = os.getloadavg()
    started = time.monotonic()
    # The runtime's fetcher, as `echolabel train-encoder` reads a folder (only inside it).
    with Runtime.build(fetch_settings) as runtime:
        fetcher = runtime.fetcher
        if trained:
            source = read_config(trained)["training"]["source"]
            if (source.get("folds"), source.get("fold")) != (folds, fold):
                raise ValueError(
                    f"{trained} was trained for fold {source.get('fold')} of "
                    f"{source.get('folds')}, not fold {fold} of {folds}: its validation "
                    "images would include images it was trained on"
                )
        summary = (
            kept_summary(trained)
            if trained
            else train_encoder(
                train_part,
                [field],
                fetcher=fetcher,
                encoders_dir=encoders_dir,
                name=f"recipe-{tag}",
                options=options,
                source={"kind": "recipe-validation", "folds": folds, "fold": fold},
            )
        )
        train_s = (
            sum(
                v
                for k, v in summary["timing_s"].items()
                if k in ("loading", "frozen_features", "training")
            )
            if trained
            else time.monotonic() - started
        )
        load_after = os.getloadavg()
        path = Path(summary["path"])
        encoder = load_trained(path)
        everything = [*train_part, *validation]
        embed_started = time.monotonic()
        pictures = [fetcher.load(s.ref, min_side=encoder.input_side) for s in everything]
        plain, mirrored = pooled_features(encoder, pictures)
        embed_s = time.monotonic() - embed_started
    classes = encoder.config["fields"][field]
    n = len(train_part)
    y = [str(s.labels[field]) for s in everything]
    results = []
    for tta in (False, True):
        features = (plain + mirrored) / 2 if tta else plain
        vectors = torch.nn.functional.normalize(features, dim=1)
        head = head_probabilities(path, features[n:])
        # The product's vote (neighbours weighed at `echolabel.vote.TEMPERATURE`), the head
        # mixed in, and the weightings it was chosen against: the similarity itself (the vote
        # until 2026-12-07), that with the class prior divided out, other temperatures, and
        # the similarities taken after the labelled rows' mean is subtracted (centred).
        for mode, power, temperature, centre in (
            ("neighbours", 0.0, TEMPERATURE, False),
            ("neighbours+head", 0.0, TEMPERATURE, False),
            ("neighbours, weighed by s", 0.0, 0.0, False),
            ("neighbours, s, prior^0.5", 0.5, 0.0, False),
            ("neighbours, s, prior^1", 1.0, 0.0, False),
            ("neighbours, exp(s/0.1)", 0.0, 0.1, False),
            ("neighbours, exp(s/0.05)", 0.0, 0.05, False),
            ("neighbours, exp(s/0.01)", 0.0, 0.01, False),
            ("neighbours, centred", 0.0, TEMPERATURE, True),
            ("neighbours, centred, exp(s/0.05)", 0.0, 0.05, True),
        ):
            scores = score_votes(
                vectors[:n],
                y[:n],
                vectors[n:],
                y[n:],
                classes,
                field,
                settings,
                head=head if mode == "neighbours+head" else None,
                head_weight=head_weight,
                prior_power=power,
                temperature=temperature,
                centre=centre,
            )
            results.append(
                {
                    "tag": tag,
                    "options": {
                        k: v
                        for k, v in dataclasses.asdict(options).items()
                        if v != getattr(TrainOptions(), k)
                    },
                    "fold": f"{fold}/{folds}",
                    "tta_hflip": tta,
                    "vote": mode,
                    **scores,
                    "train_images": n,
                    "trained_for_epochs": summary["epochs_run"],
                    "best_epoch": summary["best_epoch"],
                    "train_s": round(train_s, 1),
                    "train_s_per_1000": round(train_s / n * 1000, 1),
                    "timing_s": summary["timing_s"],
                    "embed_s_both_views": round(embed_s, 1),
                    "load_avg_before": [round(x, 2) for x in load_before],
                    "load_avg_after": [round(x, 2) for x in load_after],
                    "machine": machine(),
                    "encoder": str(path),
                }
            )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, help="print the Markdown table of an --out file")
    parser.add_argument("--images", type=Path)
    parser.add_argument("--labels", type=Path)
    parser.add_argument("--field")
    parser.add_argument("--folds", type=int, default=4, help="outer folds of the train rows")
    parser.add_argument("--fold", type=int, default=0, help="the fold held out for validation")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="TrainOptions key=value")
    parser.add_argument("--head-weight", type=float, default=0.5)
    parser.add_argument("--tag", help="name of this variant (default: from the options)")
    parser.add_argument("--encoders-dir", type=Path, help="keep the trained encoders here")
    parser.add_argument(
        "--trained",
        type=Path,
        help="score this kept encoder (trained on the same --fold) again instead of training",
    )
    parser.add_argument("--out", type=Path, help="append one JSON line per scoring")
    args = parser.parse_args(argv)
    if args.table:
        print(summarise([json.loads(line) for line in args.table.read_text().splitlines()]))
        return 0
    if not (args.images and args.labels and args.field):
        parser.error("--images, --labels and --field are required (or --table)")
    options = parse_options(args.set)
    tag = args.tag or "-".join(p.replace("=", "_") for p in args.set) or "default"
    settings = Settings.from_env()
    with tempfile.TemporaryDirectory() as scratch:
        results = run(
            args.images,
            args.labels,
            args.field,
            options,
            folds=args.folds,
            fold=args.fold,
            split_seed=args.split_seed,
            encoders_dir=args.encoders_dir or Path(scratch),
            head_weight=args.head_weight,
            settings=settings,
            tag=tag,
            trained=args.trained,
        )
    for r in results:
        print(
            f"{r['tag']}\tfold {r['fold']}\ttta {int(r['tta_hflip'])}\t{r['vote']:<16}"
            f"\tacc {r['accuracy']:.3f}\tcov {r['coverage']:.2f}\trecall {r['recall']}"
            f"\ttrain {r['train_s']:.0f} s ({r['train_s_per_1000']:.0f} s/1000)"
            f"\tload {r['load_avg_before'][0]:.1f}->{r['load_avg_after'][0]:.1f}"
        )
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(r) + "\n")
    return 0


def summarise(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of result lines (one per tag, tta and vote; folds pooled)."""
    grouped: dict[tuple[str, bool, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        grouped.setdefault((r["tag"], r["tta_hflip"], r["vote"]), []).append(r)
    lines = [
        "| variant | TTA | vote | folds | accuracy | coverage | recall | min recall "
        "| train s/1000 img | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (tag, tta, mode), group in grouped.items():
        images = sum(r["images"] for r in group)
        accuracy = sum(r["accuracy"] * r["images"] for r in group) / images
        coverage = sum(r["coverage"] * r["images"] for r in group) / images
        recall: dict[str, list[int]] = {}
        for r in group:
            for cls, frac in r["recall"].items():
                hit, total = (int(x) for x in frac.split("/"))
                recall.setdefault(cls, [0, 0])
                recall[cls][0] += hit
                recall[cls][1] += total
        lines.append(
            f"| {tag} | {'on' if tta else 'off'} | {mode} | {len(group)} | {accuracy:.3f} "
            f"| {coverage:.2f} | "
            + ", ".join(f"{c} {h}/{t}" for c, (h, t) in recall.items())
            + f" | {min(h / t for h, t in recall.values()):.2f}"
            f" | {np.mean([r['train_s_per_1000'] for r in group]):.0f}"
            f" | {np.mean([r['load_avg_before'][0] for r in group]):.1f}"
            f"–{np.mean([r['load_avg_after'][0] for r in group]):.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
