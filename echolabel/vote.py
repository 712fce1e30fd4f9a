"""Similarity-weighted vote of labelled neighbours, per choices field, with abstention."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vectorstore import Neighbour

# Cosine similarity can be ≤ 0 for unrelated images; such neighbours still count a little so
# that a field with support never has zero total weight.
_MIN_WEIGHT = 1e-6


@dataclass(frozen=True)
class FieldVote:
    """The outcome for one choices field."""

    field: str
    label: str | None  # None: abstained
    score: float  # the winner's share of the neighbours' weight (0 when no support)
    support: int  # neighbours that carry a label for this field
    weights: dict[str, float] = field(default_factory=dict)
    abstain_reason: str | None = None
    min_neighbours: int = 1  # the support the vote needed (see `certainty`)

    @property
    def abstained(self) -> bool:
        return self.label is None


def vote(
    neighbours: Sequence[Neighbour],
    fields: Sequence[str],
    *,
    min_neighbours: int,
    min_score: float,
) -> dict[str, FieldVote]:
    """Vote every field; abstain when support < min_neighbours or the share < min_score."""
    out: dict[str, FieldVote] = {}
    for name in fields:
        weights: dict[str, float] = {}
        support = 0
        for neighbour in neighbours:
            label = neighbour.labels.get(name)
            if label is None:
                continue
            support += 1
            weights[label] = weights.get(label, 0.0) + max(neighbour.similarity, _MIN_WEIGHT)
        if not weights:
            out[name] = FieldVote(name, None, 0.0, 0, {}, "no labelled neighbours", min_neighbours)
            continue
        # Ties go to the label name first in sort order, so results are reproducible.
        winner = min(weights, key=lambda label: (-weights[label], label))
        share = weights[winner] / sum(weights.values())
        reason = None
        if support < min_neighbours:
            reason = f"only {support} labelled neighbours (minimum {min_neighbours})"
        elif share < min_score:
            reason = f"winner's share {share:.2f} below {min_score:.2f}"
        out[name] = FieldVote(
            name, None if reason else winner, share, support, weights, reason, min_neighbours
        )
    return out


def certainty(field_vote: FieldVote) -> float:
    """How sure the vote of one field is: the winner's share, or 0 when too few labelled
    neighbours voted (two neighbours that agree are not a certain suggestion)."""
    return field_vote.score if field_vote.support >= field_vote.min_neighbours else 0.0


def task_score(votes: dict[str, FieldVote]) -> float:
    """The least certain field's certainty: Label Studio's Data Manager sorted by prediction
    score (ascending) then shows the most doubtful tasks first, and tasks with a field that
    could not be voted at all (score 0) before every voted one."""
    return min((certainty(v) for v in votes.values()), default=0.0)
