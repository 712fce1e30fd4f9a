"""Similarity-weighted vote of labelled neighbours, per choices field, with abstention.

Each neighbour weighs exp((s - s_max) / temperature), where s is its cosine similarity to the
task and s_max the nearest neighbour's: the nearest weighs 1 and every 0.03 of similarity
further away costs a factor e. With temperature 0 a neighbour weighs its similarity (the vote
before 2026-12-07).

A single-choice field elects one winner: the label with the largest share of the neighbours'
weight. A multi-choice field (`<Choices choice="multiple">`, stored as a list of choices) votes
each choice on its own: a choice's share is the weight of the neighbours that ticked it over
the weight of all neighbours labelled for the field, and every choice whose share reaches the
threshold is suggested.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# Cosine similarity can be ≤ 0 for unrelated images, and a far neighbour's exponential weight
# can underflow; such neighbours still count a little so that a field with support never has
# zero total weight.
_MIN_WEIGHT = 1e-6

# Chosen on BUSI's validation folds (bench/vote_weighting.py, bench/recipe_validation.py;
# docs/evaluation.md#how-the-vote-weighs-its-neighbours): with the frozen EfficientNet-Lite0,
# the 4-fold vote of the training rows is right on 0.691 at 0.03 against 0.619 weighing by
# similarity, and 0.636 against 0.601 with every neighbour above 0.95 similarity left out (a
# patient's other images); trained encoders gain too. 0.01 trusts the nearest neighbour too
# much: lower without the near-duplicates.
TEMPERATURE = 0.03


class Neighbour(Protocol):
    """What the vote reads of a labelled neighbour (the store's `vectorstore.Neighbour` is one);
    the vote sits below the store and knows nothing of it."""

    @property
    def similarity(self) -> float: ...

    @property
    def labels(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class FieldVote:
    """The outcome for one choices field."""

    field: str
    label: str | None  # single-choice: the winner (None: abstained); multi-choice: always None
    # Single-choice: the winner's share of the neighbours' weight. Multi-choice: the least
    # certain per-choice decision, min over choices of max(share, 1 - share). 0: no support.
    score: float
    support: int  # neighbours that carry a label for this field
    weights: dict[str, float] = field(default_factory=dict)  # summed weight per choice
    abstain_reason: str | None = None
    min_neighbours: int = 1  # the support the vote needed (see `certainty`)
    multiple: bool = False  # a multi-choice field
    choices: tuple[str, ...] = ()  # multi-choice: the suggested choices, largest share first
    shares: dict[str, float] = field(default_factory=dict)  # weight per choice / total weight

    @property
    def suggested(self) -> tuple[str, ...]:
        """The choices to suggest for this field (empty: abstained)."""
        if self.multiple:
            return self.choices
        return () if self.label is None else (self.label,)

    @property
    def abstained(self) -> bool:
        return not self.suggested


def vote(
    neighbours: Sequence[Neighbour],
    fields: Sequence[str],
    *,
    min_neighbours: int,
    min_score: float,
    multiple: Collection[str] = (),
    temperature: float = TEMPERATURE,
) -> dict[str, FieldVote]:
    """Vote every field; abstain when support < min_neighbours or the share < min_score.

    Fields named in `multiple` are multi-choice: each choice whose share is ≥ min_score is
    suggested, and the field abstains when none is. Neighbours weigh as the module docstring
    says (`temperature` 0: their similarity)."""
    weighted = list(zip(neighbour_weights(neighbours, temperature), neighbours, strict=True))
    return {
        name: (_vote_multiple if name in multiple else _vote_single)(
            name, weighted, min_neighbours, min_score
        )
        for name in fields
    }


def neighbour_weights(neighbours: Sequence[Neighbour], temperature: float) -> list[float]:
    """Each neighbour's weight in the vote: exp((s - s_max) / temperature), or its similarity
    s when `temperature` is 0; never below a tiny floor."""
    if not neighbours:
        return []
    if temperature <= 0:
        return [max(n.similarity, _MIN_WEIGHT) for n in neighbours]
    nearest = max(n.similarity for n in neighbours)
    return [max(math.exp((n.similarity - nearest) / temperature), _MIN_WEIGHT) for n in neighbours]


def _vote_single(
    name: str,
    weighted: Sequence[tuple[float, Neighbour]],
    min_neighbours: int,
    min_score: float,
) -> FieldVote:
    weights: dict[str, float] = {}
    support = 0
    for weight, neighbour in weighted:
        label = _single(neighbour.labels.get(name))
        if label is None:
            continue
        support += 1
        weights[label] = weights.get(label, 0.0) + weight
    if not weights:
        return FieldVote(name, None, 0.0, 0, {}, "no labelled neighbours", min_neighbours)
    # Ties go to the label name first in sort order, so results are reproducible.
    winner = min(weights, key=lambda label: (-weights[label], label))
    total = sum(weights.values())
    share = weights[winner] / total
    reason = None
    if support < min_neighbours:
        reason = f"only {support} labelled neighbours (minimum {min_neighbours})"
    elif share < min_score:
        reason = f"winner's share {share:.2f} below {min_score:.2f}"
    shares = {label: weight / total for label, weight in weights.items()}
    return FieldVote(
        name,
        None if reason else winner,
        share,
        support,
        weights,
        reason,
        min_neighbours,
        shares=shares,
    )


def _vote_multiple(
    name: str,
    weighted: Sequence[tuple[float, Neighbour]],
    min_neighbours: int,
    min_score: float,
) -> FieldVote:
    weights: dict[str, float] = {}
    total = 0.0
    support = 0
    for weight, neighbour in weighted:
        chosen = choice_set(neighbour.labels.get(name))
        if not chosen:
            continue
        support += 1
        total += weight
        for choice in chosen:
            weights[choice] = weights.get(choice, 0.0) + weight
    if not support:
        return FieldVote(
            name, None, 0.0, 0, {}, "no labelled neighbours", min_neighbours, multiple=True
        )
    shares = {choice: weight / total for choice, weight in weights.items()}
    # A choice no neighbour ticked has share 0 and margin 1: only the ticked ones can be the
    # least certain decision.
    score = min(max(share, 1.0 - share) for share in shares.values())
    passed = tuple(
        sorted((c for c, s in shares.items() if s >= min_score), key=lambda c: (-shares[c], c))
    )
    reason = None
    if support < min_neighbours:
        reason = f"only {support} labelled neighbours (minimum {min_neighbours})"
    elif not passed:
        best = min(shares, key=lambda c: (-shares[c], c))
        reason = f"no choice's share reaches {min_score:.2f} (best {best} {shares[best]:.2f})"
    return FieldVote(
        name,
        None,
        score,
        support,
        weights,
        reason,
        min_neighbours,
        multiple=True,
        choices=() if reason else passed,
        shares=shares,
    )


def choice_set(value: object) -> frozenset[str]:
    """The choices a stored label holds: a list of choices (multi-choice field), or one
    string (single-choice, or a multi-choice label stored before lists were)."""
    if isinstance(value, str):
        return frozenset((value,))
    if isinstance(value, (list, tuple)):
        return frozenset(str(v) for v in value)
    return frozenset()


def _single(value: object) -> str | None:
    """A single-choice vote's label: a string, or a list holding one choice (a field that was
    multi-choice when labelled). A list of several choices carries no single label."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return str(value[0])
    return None


def is_multi_choice(labels: Iterable[object]) -> bool:
    """Whether a field's stored labels are multi-choice (lists of choices)."""
    return any(isinstance(label, (list, tuple)) for label in labels)


def certainty(field_vote: FieldVote) -> float:
    """How sure the vote of one field is: its score (the winner's share; for a multi-choice
    field the least certain choice's max(share, 1 - share)), or 0 when too few labelled
    neighbours voted (two neighbours that agree are not a certain suggestion)."""
    return field_vote.score if field_vote.support >= field_vote.min_neighbours else 0.0


def task_score(votes: dict[str, FieldVote]) -> float:
    """The least certain field's certainty: Label Studio's Data Manager sorted by prediction
    score (ascending) then shows the most doubtful tasks first, and tasks with a field that
    could not be voted at all (score 0) before every voted one."""
    return min((certainty(v) for v in votes.values()), default=0.0)
