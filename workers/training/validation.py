"""Scoring the model on the early-stopping split after every epoch: the heads' accuracy, the
embedding's own kNN vote, and the vote the product makes with the training images as neighbours.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from echolabel.vote import TEMPERATURE, FieldVote, vote
from vectorstore import Neighbour
from workers.training.model import Model
from workers.training.options import TrainOptions


@torch.inference_mode()
def validate(
    model: Model,
    trunk_views: torch.Tensor,
    y: torch.Tensor,
    classes: Sequence[Sequence[str]],
    fields: Sequence[str],
    device: str,
    *,
    labelled: tuple[torch.Tensor, torch.Tensor] | None = None,
    options: TrainOptions = TrainOptions(),
    batch_size: int = 64,
) -> dict[str, Any]:
    """Head accuracy and loss per field on the validation images, and their mean; with
    `labelled` (the training images' plain trunk views and targets), also the product's vote
    of the training images for every validation image (`neighbour_vote_scores`).

    `trunk_views` is (views, images, ...): an image's features are the mean over its views
    (itself, and its mirror with test-time mirror averaging), as the saved encoder embeds."""
    model.eval()
    features = _embed(model, trunk_views, device, batch_size)
    embeddings = F.normalize(features, dim=1)
    knn = knn_vote_accuracy(embeddings, y)
    neighbour: list[tuple[float, float] | None] = [None] * len(fields)
    neighbour_s = None
    if labelled is not None:
        started = time.monotonic()
        labelled_features = _embed(model, labelled[0], device, batch_size)
        neighbour = neighbour_vote_scores(
            F.normalize(labelled_features, dim=1),
            labelled[1],
            embeddings,
            y,
            classes,
            fields,
            top_k=options.vote_top_k,
            min_neighbours=options.vote_min_neighbours,
            min_score=options.vote_min_score,
        )
        neighbour_s = time.monotonic() - started
    per_field: dict[str, Any] = {}
    losses, accuracies = [], []
    for j, name in enumerate(fields):
        logits, target = model.heads[j](features.to(device)).float().cpu(), y[:, j]
        known = target >= 0
        loss = float(F.cross_entropy(logits[known], target[known]))
        predicted = logits[known].argmax(dim=1)
        accuracy = float((predicted == target[known]).float().mean())
        recall = {
            cls: round(float((predicted[target[known] == c] == c).float().mean()), 4)
            for c, cls in enumerate(classes[j])
            if bool((target[known] == c).any())
        }
        per_field[name] = {
            "accuracy": round(accuracy, 4),
            "loss": round(loss, 4),
            "recall": recall,
            "knn_vote_accuracy": knn[j],
        }
        if labelled is not None:
            scored = neighbour[j]
            per_field[name]["neighbour_vote_accuracy"] = None if scored is None else scored[0]
            per_field[name]["neighbour_vote_coverage"] = None if scored is None else scored[1]
        losses.append(loss)
        accuracies.append(accuracy)
    scores: dict[str, Any] = {
        "val_loss": round(float(np.mean(losses)), 4),
        "val_accuracy": round(float(np.mean(accuracies)), 4),
        "val_knn_vote_accuracy": round(float(np.mean([a for a in knn if a is not None])), 4),
    }
    if labelled is not None:
        voted = [v for v in neighbour if v is not None]
        scores["val_neighbour_vote_accuracy"] = round(float(np.mean([a for a, _ in voted])), 4)
        scores["val_neighbour_vote_coverage"] = round(float(np.mean([c for _, c in voted])), 4)
        scores["neighbour_s"] = round(float(neighbour_s or 0.0), 2)
    return {**scores, "val_fields": per_field}


def _embed(model: Model, trunk_views: torch.Tensor, device: str, batch_size: int) -> torch.Tensor:
    """Pooled features (float32, CPU) of every image: the mean over its (views, images, ...)
    trunk views, as the saved encoder embeds (before the L2 normalisation)."""
    chunks = []
    for start in range(0, trunk_views.shape[1], batch_size):
        chunks.append(
            torch.stack(
                [model.rest(v[start : start + batch_size].float().to(device)) for v in trunk_views]
            )
            .mean(dim=0)
            .float()
            .cpu()
        )
    return torch.cat(chunks)


def neighbour_votes(
    labelled: torch.Tensor,
    labels: Sequence[Mapping[str, str]],
    queries: torch.Tensor,
    fields: Sequence[str],
    *,
    top_k: int,
    min_neighbours: int,
    min_score: float,
    temperature: float = TEMPERATURE,
    exclude_above: float | None = None,
    centre: bool = False,
    centre_on: torch.Tensor | None = None,
) -> list[dict[str, FieldVote]]:
    """The vote the product makes for each query (rows L2-normalised): its `top_k` most
    similar labelled rows, each with its `labels`, voted by `echolabel.vote` (`temperature`:
    how the vote weighs them; the product's by default). With `exclude_above`, rows at or
    above that similarity to a query are not its neighbours (near-duplicates left out).

    With `centre`, the labelled rows' mean (or that of `centre_on`'s rows) is subtracted from
    every row and the rows are normalised again before the neighbours are ranked and weighed
    (label-free: it uses no label; `exclude_above` still compares the rows as given). The
    backend centres a pretrained encoder's vectors before they are stored instead
    (echolabel/encoders/centred.py); this scores the choice on validation
    (docs/evaluation.md, "Centring the embeddings")."""
    similarity = queries @ labelled.T
    excluded = similarity >= exclude_above if exclude_above is not None else None
    if centre:
        mean = (labelled if centre_on is None else centre_on).mean(dim=0)
        similarity = F.normalize(queries - mean, dim=1) @ F.normalize(labelled - mean, dim=1).T
    if excluded is not None:
        similarity = similarity.masked_fill(excluded, float("-inf"))
    sims, indices = similarity.topk(min(top_k, len(labelled)), dim=1)
    return [
        vote(
            [
                Neighbour(task=int(i), similarity=float(s), labels=labels[int(i)])
                for s, i in zip(sims[row], indices[row], strict=True)
                if s > float("-inf")  # fewer than top_k left after exclude_above
            ],
            fields,
            min_neighbours=min_neighbours,
            min_score=min_score,
            temperature=temperature,
        )
        for row in range(len(queries))
    ]


def neighbour_vote_scores(
    labelled: torch.Tensor,
    labelled_y: torch.Tensor,
    queries: torch.Tensor,
    query_y: torch.Tensor,
    classes: Sequence[Sequence[str]],
    fields: Sequence[str],
    *,
    top_k: int,
    min_neighbours: int,
    min_score: float,
) -> list[tuple[float, float] | None]:
    """Per field, (accuracy, coverage) of the vote the product makes: each query (row,
    L2-normalised) voted by its `top_k` most similar labelled rows with `echolabel.vote` and
    the given minimum support and share, an abstention counting as a miss; None for a field
    no query is labelled for. Targets are class indices, < 0 where an image has no label."""
    labels = [
        {name: classes[j][int(row[j])] for j, name in enumerate(fields) if row[j] >= 0}
        for row in labelled_y
    ]
    outcomes = neighbour_votes(
        labelled,
        labels,
        queries,
        fields,
        top_k=top_k,
        min_neighbours=min_neighbours,
        min_score=min_score,
    )
    out: list[tuple[float, float] | None] = []
    for j, name in enumerate(fields):
        known = [row for row in range(len(queries)) if query_y[row, j] >= 0]
        if not known:
            out.append(None)
            continue
        chosen = [outcomes[row][name].label for row in known]
        truth = [classes[j][int(query_y[row, j])] for row in known]
        correct = sum(c == t for c, t in zip(chosen, truth, strict=True))
        voted = sum(c is not None for c in chosen)
        out.append((round(correct / len(known), 4), round(voted / len(known), 4)))
    return out


def knn_vote_accuracy(embeddings: torch.Tensor, y: torch.Tensor, k: int = 10) -> list[float | None]:
    """Per field: how often the similarity-weighted vote of an image's k nearest other
    validation images is its label (leave-one-out within the validation split): the
    embedding's own quality, which the heads' accuracy only approximates."""
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(float("-inf"))
    k = min(k, len(embeddings) - 1)
    sims, indices = similarity.topk(k, dim=1)
    out = []
    for j in range(y.shape[1]):
        labels = y[:, j]
        known = labels >= 0
        if not known.any():
            out.append(None)  # no validation image has this field
            continue
        votes = torch.zeros(len(labels), int(labels.max()) + 1)
        neighbour = labels[indices]
        weights = sims.clamp(min=0) * (neighbour >= 0)
        votes.scatter_add_(1, neighbour.clamp(min=0), weights)
        out.append(round(float((votes.argmax(dim=1) == labels)[known].float().mean()), 4))
    return out
