"""The similarity-weighted vote, checked against hand-computed expectations: the rules that
combine weights (shares, thresholds, multi-choice) with plain similarity weights (temperature
0), then the product's exponential weights."""

from __future__ import annotations

import functools
import math

import pytest

from echolabel import vote as voting
from echolabel.vote import neighbour_weights, task_score
from vectorstore import Neighbour

# Similarity weights keep the hand-computed shares readable.
vote = functools.partial(voting.vote, temperature=0.0)


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


# -- multi-choice fields (<Choices choice="multiple">): each choice voted on its own share --


def m(sim: float, **labels: str | list[str]) -> Neighbour:
    return Neighbour(task=id(labels), similarity=sim, labels=labels)


FOUR = [
    m(0.9, findings=["calcification", "mass"]),
    m(0.8, findings=["mass"]),
    m(0.5, findings=["calcification"]),
    m(0.3, findings=["mass", "shadowing"]),
]
# Total weight of the labelled neighbours: 0.9 + 0.8 + 0.5 + 0.3 = 2.5
#   mass:          0.9 + 0.8 + 0.3 = 2.0 → share 2.0 / 2.5 = 0.80
#   calcification: 0.9 + 0.5       = 1.4 → share 1.4 / 2.5 = 0.56
#   shadowing:     0.3             = 0.3 → share 0.3 / 2.5 = 0.12
# Margins max(share, 1 - share): 0.80, 0.56, 0.88 → the field's score is the least, 0.56.


def test_multi_choice_suggests_every_choice_at_or_above_the_threshold():
    votes = vote(FOUR, ["findings"], min_neighbours=3, min_score=0.5, multiple=["findings"])
    findings = votes["findings"]
    assert findings.multiple and not findings.abstained and findings.label is None
    assert findings.choices == ("mass", "calcification")  # largest share first
    assert findings.suggested == ("mass", "calcification")
    assert findings.shares == pytest.approx({"mass": 0.8, "calcification": 0.56, "shadowing": 0.12})
    assert findings.weights == pytest.approx({"mass": 2.0, "calcification": 1.4, "shadowing": 0.3})
    assert findings.support == 4
    assert findings.score == pytest.approx(0.56)
    assert task_score(votes) == pytest.approx(0.56)


def test_multi_choice_threshold_decides_each_choice_and_the_score_stays_the_margin():
    # min_score 0.6: calcification (0.56) drops, mass (0.80) stays; the score is unchanged
    # because it measures the decisions (0.56 is as doubtful a "no" as it was a "yes").
    votes = vote(FOUR, ["findings"], min_neighbours=3, min_score=0.6, multiple=["findings"])
    assert votes["findings"].choices == ("mass",)
    assert votes["findings"].score == pytest.approx(0.56)
    # min_score 0.85: no choice passes → the field abstains, with the best share named.
    votes = vote(FOUR, ["findings"], min_neighbours=3, min_score=0.85, multiple=["findings"])
    findings = votes["findings"]
    assert findings.abstained and findings.choices == () and findings.suggested == ()
    assert findings.abstain_reason == "no choice's share reaches 0.85 (best mass 0.80)"
    assert findings.score == pytest.approx(0.56)


def test_multi_choice_share_exactly_at_the_threshold_is_suggested_like_single_choice():
    # a: 0.5 + 0.5 = 1.0 of 1.0 → 1.0; b: 0.5 of 1.0 → 0.5 (= min_score: suggested, as a
    # single-choice winner at exactly min_score is). Margins 1.0 and 0.5 → score 0.5.
    votes = vote(
        [m(0.5, f=["a"]), m(0.5, f=["a", "b"])],
        ["f"],
        min_neighbours=1,
        min_score=0.5,
        multiple=["f"],
    )
    assert votes["f"].choices == ("a", "b") and votes["f"].score == pytest.approx(0.5)


def test_multi_choice_abstains_on_low_support_and_counts_only_neighbours_labelled_for_it():
    neighbours = [
        *FOUR,
        m(0.95, organ="breast"),  # labelled, but not for findings: no weight, no support
    ]
    votes = vote(
        neighbours,
        ["findings", "organ"],
        min_neighbours=5,
        min_score=0.5,
        multiple=["findings"],
    )
    findings = votes["findings"]
    assert findings.support == 4 and findings.abstained
    assert findings.abstain_reason == "only 4 labelled neighbours (minimum 5)"
    assert findings.shares["mass"] == pytest.approx(0.8)  # the 0.95 neighbour is not counted
    assert task_score(votes) == 0.0  # too few neighbours: certainty 0, sorted first
    none = vote(
        [m(0.9, organ="x")], ["findings"], min_neighbours=1, min_score=0.5, multiple=["findings"]
    )
    assert none["findings"].abstained and none["findings"].support == 0
    assert (
        none["findings"].abstain_reason == "no labelled neighbours"
        and none["findings"].score == 0.0
    )


def test_multi_and_single_choice_fields_together():
    # findings as in FOUR; organ single-choice on the same neighbours:
    # breast 0.9 + 0.8 = 1.7, liver 0.5 + 0.3 = 0.8 → breast 1.7 / 2.5 = 0.68.
    neighbours = [
        m(n.similarity, findings=list(n.labels["findings"]), organ=organ)
        for n, organ in zip(FOUR, ["breast", "breast", "liver", "liver"], strict=True)
    ]
    votes = vote(
        neighbours,
        ["organ", "findings"],
        min_neighbours=3,
        min_score=0.5,
        multiple=["findings"],
    )
    assert (votes["organ"].label, votes["organ"].suggested) == ("breast", ("breast",))
    assert votes["organ"].score == pytest.approx(0.68) and not votes["organ"].multiple
    assert votes["findings"].choices == ("mass", "calcification")
    assert task_score(votes) == pytest.approx(0.56)  # min(0.68, 0.56)


def test_stored_label_shapes_across_a_changed_config():
    # A multi-choice field labelled before lists were stored holds one string: one choice.
    # mass: 0.9 + 0.6 = 1.5 of 1.5 → 1.0; cyst: 0.9 of 1.5 → 0.6.
    votes = vote(
        [m(0.9, f=["cyst", "mass"]), m(0.6, f="mass")],
        ["f"],
        min_neighbours=1,
        min_score=0.5,
        multiple=["f"],
    )
    assert votes["f"].choices == ("mass", "cyst") and votes["f"].score == pytest.approx(0.6)
    # A single-choice field that was multi-choice when labelled: a one-choice list counts as
    # that choice, a list of several carries no single label (not counted).
    votes = vote(
        [m(0.9, f=["cyst", "mass"]), m(0.6, f=["mass"]), m(0.3, f="cyst")],
        ["f"],
        min_neighbours=1,
        min_score=0.5,
    )
    assert votes["f"].support == 2 and votes["f"].label == "mass"
    assert votes["f"].score == pytest.approx(0.6 / 0.9)


def test_default_weights_fall_by_e_every_temperature_of_similarity():
    assert voting.TEMPERATURE == 0.03
    near = [n(0.9, f="a"), n(0.87, f="b"), n(0.84, f="a")]
    assert neighbour_weights(near, 0.03) == pytest.approx([1.0, math.exp(-1), math.exp(-2)])
    votes = voting.vote(near, ["f"], min_neighbours=3, min_score=0.5)
    expected = (1 + math.exp(-2)) / (1 + math.exp(-1) + math.exp(-2))
    assert votes["f"].label == "a" and votes["f"].score == pytest.approx(expected)


def test_default_weights_let_the_nearest_outvote_two_further_ones():
    # Similarity weights: a 0.84 + 0.84 beats b 0.9; exponential: 2e^-2 ≈ 0.27 loses to 1.
    near = [n(0.84, f="a"), n(0.84, f="a"), n(0.9, f="b")]
    assert vote(near, ["f"], min_neighbours=1, min_score=0.0)["f"].label == "a"
    sharp = voting.vote(near, ["f"], min_neighbours=1, min_score=0.0)["f"]
    assert sharp.label == "b" and sharp.score == pytest.approx(1 / (1 + 2 * math.exp(-2)))


def test_far_neighbours_keep_a_floor_weight_so_every_labelled_field_has_a_vote():
    # The nearest carries no label for "g"; the others are 0.3 further: e^-10 each, above the
    # floor, so "g" is voted by its own neighbours alone.
    near = [n(0.99, f="a"), n(0.69, g="x"), n(0.69, g="y"), n(0.69, g="x")]
    votes = voting.vote(near, ["f", "g"], min_neighbours=1, min_score=0.5)
    assert votes["g"].label == "x" and votes["g"].score == pytest.approx(2 / 3)
    # Beyond what a float holds (e^-2000): the floor, all equal.
    far = [n(1.0, f="a"), n(-1.0, g="x"), n(-1.0, g="y"), n(-1.0, g="x")]
    assert voting.vote(far, ["g"], min_neighbours=1, min_score=0.5)["g"].score == pytest.approx(
        2 / 3
    )
