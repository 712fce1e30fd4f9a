"""The similarity-weighted vote, checked against hand-computed expectations."""

from __future__ import annotations

import pytest

from echolabel.vote import task_score, vote
from vectorstore import Neighbour


def n(sim: float, **labels: str) -> Neighbour:
    return Neighbour(task=id(labels), similarity=sim, labels=labels)


def test_weighted_winner_and_share():
    # liver: 0.9 + 0.5 = 1.4; heart: 0.8 → share 1.4 / 2.2
    votes = vote(
        [n(0.9, organ="liver"), n(0.8, organ="heart"), n(0.5, organ="liver")],
        ["organ"],
        min_neighbours=3,
        min_score=0.5,
    )
    organ = votes["organ"]
    assert organ.label == "liver"
    assert organ.score == pytest.approx(1.4 / 2.2)
    assert organ.support == 3
    assert organ.weights == pytest.approx({"liver": 1.4, "heart": 0.8})


def test_weight_beats_count():
    # two weak "a" (0.1 + 0.1) lose to one strong "b" (0.9)
    votes = vote(
        [n(0.1, f="a"), n(0.1, f="a"), n(0.9, f="b")], ["f"], min_neighbours=1, min_score=0.0
    )
    assert votes["f"].label == "b"
    assert votes["f"].score == pytest.approx(0.9 / 1.1)


def test_abstains_on_low_share_and_on_low_support():
    votes = vote(
        [n(0.5, f="a"), n(0.5, f="b"), n(0.5, g="x")],
        ["f", "g", "h"],
        min_neighbours=2,
        min_score=0.6,
    )
    assert votes["f"].abstained and "share 0.50 below 0.60" in votes["f"].abstain_reason
    assert votes["f"].score == pytest.approx(0.5)
    assert votes["g"].abstained and "only 1 labelled" in votes["g"].abstain_reason
    assert votes["h"].abstained and votes["h"].support == 0 and votes["h"].score == 0.0


def test_fields_are_voted_independently_with_partial_labels():
    votes = vote(
        [n(0.9, organ="liver", plane="axial"), n(0.8, organ="liver")],
        ["organ", "plane"],
        min_neighbours=1,
        min_score=0.5,
    )
    assert (votes["organ"].label, votes["organ"].support) == ("liver", 2)
    assert (votes["plane"].label, votes["plane"].support) == ("axial", 1)


def test_ties_are_broken_by_label_name_and_negative_similarity_counts_little():
    votes = vote([n(0.5, f="b"), n(0.5, f="a")], ["f"], min_neighbours=1, min_score=0.0)
    assert votes["f"].label == "a" and votes["f"].score == pytest.approx(0.5)
    votes = vote([n(-0.2, f="a"), n(0.3, f="b")], ["f"], min_neighbours=1, min_score=0.0)
    assert votes["f"].label == "b" and votes["f"].score > 0.99


def test_task_score_is_the_least_certain_field():
    votes = vote(
        [n(0.9, f="a", g="x"), n(0.3, f="a", g="y")], ["f", "g"], min_neighbours=1, min_score=0.0
    )
    assert task_score(votes) == pytest.approx(0.75)
    assert task_score({}) == 0.0


def test_task_score_sorts_abstained_tasks_before_voted_ones_and_doubt_before_certainty():
    """Ascending task score = Label Studio's Data Manager sorted by prediction score: tasks
    whose field had too few labelled neighbours come first, then the split votes, then the
    confident ones (even when the few neighbours agreed completely)."""
    few = vote([n(0.9, f="a"), n(0.8, f="a")], ["f"], min_neighbours=3, min_score=0.5)
    split = vote(
        [n(0.9, f="a"), n(0.9, f="b"), n(0.8, f="c"), n(0.7, f="a")],
        ["f"],
        min_neighbours=3,
        min_score=0.5,
    )
    sure = vote(
        [n(0.9, f="a"), n(0.9, f="a"), n(0.8, f="b")], ["f"], min_neighbours=3, min_score=0.5
    )
    assert few["f"].abstained and few["f"].score == pytest.approx(1.0)
    assert split["f"].abstained and not sure["f"].abstained
    scores = [task_score(v) for v in (few, split, sure)]
    assert scores == sorted(scores) and scores[0] == 0.0 < scores[1] < 0.5 <= scores[2]
    assert scores[1] == pytest.approx(split["f"].score)
    assert scores[2] == pytest.approx(sure["f"].score)
