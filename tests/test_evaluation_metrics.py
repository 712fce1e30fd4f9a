"""Leave-one-out evaluation metrics, checked against hand-computed expectations.

Most tests use six unit vectors in 2-D at these angles (degrees), so that every similarity is
cos(angle between them) and every neighbour order can be read off a circle:

    item    0    1    2     3    4     5
    angle   0   20  -20    90  130   210
    label   A    A    A     B    B     C      (C: a class with one image)

Angular distances, and the resulting orders (ties by index):
    0: 1:20  2:20  3:90   4:130 5:150  → 1 2 3 4 5   (1 and 2 tie exactly: mirror images)
    1: 0:20  2:40  3:70   4:110 5:170  → 0 2 3 4 5
    2: 0:20  1:40  3:110  5:130 4:150  → 0 1 3 5 4
    3: 4:40  1:70  0:90   2:110 5:120  → 4 1 0 2 5
    4: 3:40  5:80  1:110  0:130 2:150  → 3 5 1 0 2
    5: 4:80  3:120 2:130  0:150 1:170  → 4 3 2 0 1
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import unit_rows
from workers.evaluation.metrics import (
    label_match,
    leave_one_out_neighbours,
    precision_at_k,
    vote_metrics,
)

ANGLES = [0, 20, -20, 90, 130, 210]
LABELS = ["A", "A", "A", "B", "B", "C"]
ORDER = [[1, 2, 3, 4, 5], [0, 2, 3, 4, 5], [0, 1, 3, 5, 4], [4, 1, 0, 2, 5], [3, 5, 1, 0, 2]]
ORDER += [[4, 3, 2, 0, 1]]
# The hand-computed shares below weigh each neighbour by its similarity (the vote's
# temperature 0); tests/test_vote.py checks the product's exponential weights.
PLAIN = {"temperature": 0.0}


def cos(degrees: float) -> float:
    return float(np.cos(np.deg2rad(degrees)))


@pytest.fixture(scope="module")
def circle() -> np.ndarray:
    radians = np.deg2rad(ANGLES)
    vectors = np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)
    vectors[2] = vectors[1] * [1, -1]  # exact mirror of item 1, so 0's tie is exact
    return vectors


@pytest.fixture(scope="module")
def top3(circle) -> tuple[np.ndarray, np.ndarray]:
    return leave_one_out_neighbours(circle, 3)


# --- neighbours -------------------------------------------------------------------------------


def test_neighbours_are_the_other_items_best_first(circle):
    indices, sims = leave_one_out_neighbours(circle, 5)
    assert indices.dtype == np.int64 and sims.dtype == np.float32
    assert indices.tolist() == ORDER
    # query 0: cos 20, cos 20, cos 90, cos 130, cos 150
    assert sims[0] == pytest.approx([cos(20), cos(20), 0, cos(130), cos(150)], abs=1e-6)
    # query 3: cos 40, cos 70, cos 90, cos 110, cos 120
    assert sims[3] == pytest.approx([cos(40), cos(70), 0, cos(110), cos(120)], abs=1e-6)


def test_ties_are_broken_by_index_whatever_the_block():
    # Items 0, 1, 2, 4 are the same vector: every tie must come out in index order.
    same = [1.0, 0.0]
    vectors = np.array([same, same, same, [0.0, 1.0], same], dtype=np.float32)
    expected = [[1, 2, 4, 3], [0, 2, 4, 3], [0, 1, 4, 3], [0, 1, 2, 4], [0, 1, 2, 3]]
    for block in (1, 2, 1024):
        indices, sims = leave_one_out_neighbours(vectors, 4, block=block)
        assert indices.tolist() == expected
        assert sims[3].tolist() == [0.0, 0.0, 0.0, 0.0]
    # The cut at k = 2 falls inside the tie for query 0: the lowest indices are kept.
    assert leave_one_out_neighbours(vectors, 2)[0][0].tolist() == [1, 2]


def test_leave_patient_out_excludes_the_querys_group(circle):
    # 0,1 share a patient, 3,4 share a patient, 2 and 5 have none (None never groups items).
    groups = ["p1", "p1", None, "p3", "p3", None]
    indices, sims = leave_one_out_neighbours(circle, 5, groups=groups)
    assert indices.tolist() == [
        [2, 3, 4, 5, -1],  # 1 excluded (same patient): only 4 candidates left, then padding
        [2, 3, 4, 5, -1],  # 0 excluded
        [0, 1, 3, 5, 4],  # no group: all other items
        [1, 0, 2, 5, -1],  # 4 excluded
        [5, 1, 0, 2, -1],  # 3 excluded
        [4, 3, 2, 0, 1],  # no group; 2 (also None) is not excluded
    ]
    assert np.isnan(sims[indices == -1]).all()
    assert not np.isnan(sims[indices != -1]).any()


def test_k_larger_than_n_minus_1_is_padded(circle):
    indices, sims = leave_one_out_neighbours(circle, 10)
    assert indices.shape == (6, 10) and sims.shape == (6, 10)
    assert indices[:, :5].tolist() == ORDER
    assert (indices[:, 5:] == -1).all() and np.isnan(sims[:, 5:]).all()

    # Query A finds both other A's among its 5 real neighbours; padding is a miss.
    match = label_match(LABELS, indices, k=10, min_class_size=1)
    assert match["per_class"]["A"]["same_in_top10"] == 2.0
    # Papers' formula: 3 / 6 × 10 = 5 (more than can exist); leave-one-out: a random draw
    # returns at most n - 1 = 5 items, 2 of the 5 others are A → 2 / 5 × 5 = 2.
    assert match["per_class"]["A"]["random_expectation"] == pytest.approx(5.0)
    assert match["per_class"]["A"]["random_expectation_loo"] == pytest.approx(2.0)
    # P@10 for an A query: 2 hits / 10
    assert precision_at_k(LABELS, indices, ks=(10,))["per_class"]["A"]["10"] == pytest.approx(0.2)

    single = leave_one_out_neighbours(np.array([[0.0, 1.0]]), 3)
    assert single[0].tolist() == [[-1, -1, -1]]


def test_block_size_keeps_neighbours_and_matches_brute_force():
    rng = np.random.default_rng(0)
    vectors = unit_rows(rng, 200)
    indices, sims = leave_one_out_neighbours(vectors, 10)
    small_blocks = leave_one_out_neighbours(vectors, 10, block=7)
    # Other block shapes may round the last float32 bit differently (BLAS), nothing more.
    np.testing.assert_array_equal(indices, small_blocks[0])
    np.testing.assert_allclose(sims, small_blocks[1], atol=1e-6)

    full = vectors.astype(np.float64) @ vectors.T.astype(np.float64)
    np.fill_diagonal(full, -np.inf)
    expected = np.argsort(-full, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(sims, np.take_along_axis(full, expected, axis=1), atol=1e-6)


# --- label match (Takacs et al.) --------------------------------------------------------------


def test_label_match_per_class_weighted_and_random_expectation(top3):
    indices, _ = top3
    # Top 3 with labels: 0 → A A B, 1 → A A B, 2 → A A B, 3 → B A A, 4 → B C A, 5 → B B A
    match = label_match(LABELS, indices, k=3, min_class_size=2)
    assert match["k"] == 3 and match["total"] == 6
    a, b, c = (match["per_class"][name] for name in "ABC")
    # A: 2 same each; random 3/6×3 = 1.5; loo (3-1)/(6-1)×3 = 1.2; lift 2/1.5
    assert a == pytest.approx(
        {
            "count": 3,
            "same_in_top10": 2.0,
            "random_expectation": 1.5,
            "random_expectation_loo": 1.2,
            "lift": 4 / 3,
        }
    )
    # B: 1 same each; random 2/6×3 = 1.0; loo 1/5×3 = 0.6; lift 1
    assert b == pytest.approx(
        {
            "count": 2,
            "same_in_top10": 1.0,
            "random_expectation": 1.0,
            "random_expectation_loo": 0.6,
            "lift": 1.0,
        }
    )
    # C has one image: never a match by construction, but the papers' expectation is 1/6×3
    assert c == pytest.approx(
        {
            "count": 1,
            "same_in_top10": 0.0,
            "random_expectation": 0.5,
            "random_expectation_loo": 0.0,
            "lift": 0.0,
        }
    )
    # min_class_size 2 drops C: same (3×2 + 2×1)/5 = 1.6; random (3×1.5 + 2×1.0)/5 = 1.3;
    # loo (3×1.2 + 2×0.6)/5 = 0.96
    assert match["classes_in_weighted_average"] == ["A", "B"]
    assert match["weighted_over_all_classes"] is False
    assert match["weighted_same_in_top10"] == pytest.approx(1.6)
    assert match["weighted_random_expectation"] == pytest.approx(1.3)
    assert match["weighted_random_expectation_loo"] == pytest.approx(0.96)
    assert match["weighted_lift"] == pytest.approx(1.6 / 1.3)


def test_weighted_average_over_all_classes_when_none_is_large_enough(top3):
    match = label_match(LABELS, top3[0], k=3, min_class_size=4)
    assert match["weighted_over_all_classes"] is True
    assert match["classes_in_weighted_average"] == ["A", "B", "C"]
    # (3×2 + 2×1 + 1×0)/6 = 8/6; random (3×1.5 + 2×1 + 1×0.5)/6 = 7/6
    assert match["weighted_same_in_top10"] == pytest.approx(8 / 6)
    assert match["weighted_random_expectation"] == pytest.approx(7 / 6)


def test_unlabelled_items_are_neither_queries_nor_matches(top3):
    indices, _ = top3
    labels = ["A", "A", "A", "B", "B", None]
    match = label_match(labels, indices, k=3, min_class_size=1)
    assert sorted(match["per_class"]) == ["A", "B"] and match["total"] == 5
    # B: query 3 → B A A (1), query 4 → B None A (1: the unlabelled 5 is no match)
    assert match["per_class"]["B"]["same_in_top10"] == 1.0
    # Papers' formula over the 5 labelled: 2/5×3 = 1.2; loo over the 6 retrievable: 1/5×3
    assert match["per_class"]["B"]["random_expectation"] == pytest.approx(1.2)
    assert match["per_class"]["B"]["random_expectation_loo"] == pytest.approx(0.6)
    # Query 5 is not counted: P@1 micro over 5 queries, all hits (1, 0, 0, 4, 3)
    assert precision_at_k(labels, indices, ks=(1,))["micro"]["1"] == 1.0


def test_shuffled_labels_match_the_random_expectation():
    # Labels independent of the vectors: the measured count must agree with chance.
    rng = np.random.default_rng(7)
    vectors = unit_rows(rng, 600)
    labels = rng.permutation(["big"] * 300 + ["mid"] * 200 + ["small"] * 100).tolist()
    indices, _ = leave_one_out_neighbours(vectors, 10)
    match = label_match(labels, indices, k=10, min_class_size=20)
    # loo: (300×299/599 + 200×199/599 + 100×99/599)×10/600 ≈ 3.878; papers' ≈ 3.889
    assert match["weighted_random_expectation_loo"] == pytest.approx(3.8787, abs=1e-3)
    assert match["weighted_random_expectation"] == pytest.approx(3.8889, abs=1e-3)
    assert match["weighted_same_in_top10"] == pytest.approx(
        match["weighted_random_expectation_loo"], abs=0.15
    )
    # Per class the mean rests on 100–300 queries (σ ≈ 0.1–0.15), hence the looser bound.
    for name, stats in match["per_class"].items():
        expected = stats["random_expectation_loo"]
        assert stats["same_in_top10"] == pytest.approx(expected, abs=0.4), name


# --- precision at k (Denner et al.) -----------------------------------------------------------


def test_precision_at_k_micro_and_macro(top3):
    precision = precision_at_k(LABELS, top3[0], ks=(1, 3))
    # P@1 hits: 0→1 A, 1→0 A, 2→0 A, 3→4 B, 4→3 B, 5→4 B ✗ → micro 5/6
    # per class A 1, B 1, C 0 → macro 2/3
    assert precision["micro"]["1"] == pytest.approx(5 / 6)
    assert precision["macro"]["1"] == pytest.approx(2 / 3)
    # P@3: A 2/3 each, B 1/3 each, C 0 → micro (3×2/3 + 2×1/3)/6 = 4/9, macro (2/3+1/3+0)/3
    assert precision["micro"]["3"] == pytest.approx(4 / 9)
    assert precision["macro"]["3"] == pytest.approx(1 / 3)
    assert precision["per_class"]["A"] == pytest.approx({"1": 1.0, "3": 2 / 3})
    assert precision["per_class"]["B"] == pytest.approx({"1": 1.0, "3": 1 / 3})
    assert precision["per_class"]["C"] == {"1": 0.0, "3": 0.0}


# --- the backend's vote -----------------------------------------------------------------------

# Weights are similarities (≤ 0 counts as 1e-6). Shares of the winner with k = 3:
#   0: A cos20+cos20 vs B ~0          → A ≈ 1.0        ✓
#   1: A cos20+cos40 vs B cos70       → A 1.7057/2.0477 = 0.833 ✓
#   2: A cos20+cos40 vs B ~0          → A ≈ 1.0        ✓
#   3: B cos40 vs A cos70+~0          → B 0.7660/1.1081 = 0.691 ✓ (abstains at min_score 0.7)
#   4: B cos40 vs C cos80 vs A ~0     → B 0.7660/0.9397 = 0.815 ✓
#   5: B cos80+~0 vs A ~0             → B ≈ 1.0        ✗ (true C)
SCORES = [1.0, 1.7057 / 2.0477, 1.0, 0.7660 / 1.1081, 0.7660 / 0.9397, 1.0]


def test_vote_accuracy_coverage_f1_and_confusion_with_one_abstention(top3):
    indices, sims = top3
    result = vote_metrics(LABELS, indices, sims, k=3, min_neighbours=3, min_score=0.7, **PLAIN)
    assert (result["queries"], result["voted"], result["abstained"]) == (6, 5, 1)
    assert result["coverage"] == pytest.approx(5 / 6)
    # voted 0 1 2 4 5; correct 0 1 2 4 → 4/5
    assert result["accuracy"] == pytest.approx(0.8)
    # A: P 3/3 R 3/3 F1 1; B: P 1/2 (5 voted B) R 1/1 F1 2/3; C: never voted → P 0, R 0/1, F1 0
    assert result["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert result["per_class"]["B"] == pytest.approx(
        {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1}
    )
    assert result["confusion"] == {
        "classes": ["A", "B", "C"],
        "matrix": [[3, 0, 0], [0, 1, 0], [0, 1, 0]],  # rows true, columns voted
    }


def test_coverage_curve_and_calibration(top3):
    indices, sims = top3
    result = vote_metrics(LABELS, indices, sims, k=3, min_neighbours=3, min_score=0.7, **PLAIN)
    curve = {round(point["threshold"], 2): point for point in result["coverage_curve"]}
    assert len(curve) == 21
    coverages = [point["coverage"] for point in result["coverage_curve"]]
    assert (np.diff(coverages) <= 0).all()  # never increases
    assert curve[0.0] == pytest.approx({"threshold": 0.0, "coverage": 1.0, "accuracy": 5 / 6})
    assert curve[0.7]["coverage"] == pytest.approx(5 / 6)  # 3 drops out (0.691)
    # Above 0.833 only the shares ≈ 1 remain: 0 ✓, 2 ✓, 5 ✗
    assert curve[0.85]["coverage"] == 0.5 and curve[0.85]["accuracy"] == pytest.approx(2 / 3)
    # Every share is below 1 (≤ 0 similarities still weigh 1e-6): nothing voted, no accuracy
    assert curve[1.0] == {"threshold": 1.0, "coverage": 0.0, "accuracy": None}

    # At min_score 0 all six vote: 0.691 → [0.6, 0.7); 0.833, 0.815 → [0.8, 0.9);
    # three ≈ 1.0 → [0.9, 1.0] of which one (5) is wrong.
    calibration = result["calibration"]
    assert [b["count"] for b in calibration] == [0, 0, 0, 0, 0, 0, 1, 0, 2, 3]
    assert [b["low"] for b in calibration] == pytest.approx([i / 10 for i in range(10)])
    assert calibration[6]["accuracy"] == 1.0 and calibration[9]["accuracy"] == pytest.approx(2 / 3)
    assert calibration[8]["mean_score"] == pytest.approx((SCORES[1] + SCORES[4]) / 2, abs=1e-3)
    assert calibration[0]["mean_score"] is None and calibration[0]["accuracy"] is None


def test_coverage_curve_agrees_with_voting_at_each_threshold():
    # The curve is derived from one pass at min_score 0; voting afresh must give the same.
    rng = np.random.default_rng(3)
    vectors = unit_rows(rng, 120, dim=4)
    labels = rng.choice(["a", "b", "c"], size=120).tolist()
    indices, sims = leave_one_out_neighbours(vectors, 10)
    curve = vote_metrics(labels, indices, sims, min_neighbours=5, min_score=0.0)["coverage_curve"]
    for point in curve[::4]:
        fresh = vote_metrics(labels, indices, sims, min_neighbours=5, min_score=point["threshold"])
        assert fresh["coverage"] == pytest.approx(point["coverage"])
        assert fresh["accuracy"] == pytest.approx(point["accuracy"])


def test_unlabelled_neighbours_give_no_support(top3):
    indices, sims = top3
    labels = ["A", "A", "A", "B", "B", None]
    result = vote_metrics(labels, indices, sims, k=3, min_neighbours=3, min_score=0.0)
    # 5 is no query; 4's neighbours are 3 (B), 5 (None), 1 (A): support 2 < 3 → abstains
    assert (result["queries"], result["voted"], result["abstained"]) == (5, 4, 1)
    assert result["accuracy"] == 1.0
    assert result["confusion"]["matrix"] == [[3, 0], [0, 1]]


def test_nothing_voted_gives_no_accuracy(top3):
    indices, sims = top3
    result = vote_metrics(LABELS, indices, sims, k=3, min_neighbours=4, min_score=0.0, **PLAIN)
    assert result["coverage"] == 0.0 and result["abstained"] == 6
    assert result["accuracy"] is None and result["macro_f1"] is None
    assert all(point["accuracy"] is None for point in result["coverage_curve"])
    assert sum(b["count"] for b in result["calibration"]) == 0


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: leave_one_out_neighbours(np.zeros((0, 3), np.float32), 3), "non-empty"),
        (lambda: leave_one_out_neighbours(np.ones((2, 2), np.float32), 1), "L2-normalised"),
        (lambda: leave_one_out_neighbours(np.eye(2, dtype=np.float32), 0), "k must"),
        (lambda: leave_one_out_neighbours(np.eye(2), 1, groups=["a"]), "groups has 1"),
        (lambda: label_match([], np.zeros((0, 10), np.int64)), "labels is empty"),
        (lambda: label_match([None, None], np.array([[1], [0]]), k=1), "no labelled items"),
        (lambda: label_match(["a", "b"], np.array([[1], [0]]), k=10), "retrieve with k"),
        (lambda: precision_at_k(["a", "b"], np.array([[1], [0]]), ks=(1, 3)), "retrieve with"),
        (lambda: precision_at_k(["a", "b"], np.array([[1], [0]]), ks=()), "non-empty"),
        (
            lambda: vote_metrics(
                ["a", "b"],
                np.array([[1], [0]]),
                np.ones((2, 2)),
                k=1,
                min_neighbours=1,
                min_score=0.0,
            ),
            "similarities have shape",
        ),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_choose_k_prefers_the_k_that_votes_best_on_the_validation_split():
    from workers.evaluation.metrics import choose_k

    # A small class A (0°, 1°) beside a large class B (4°..12°), close enough that eight B
    # neighbours outweigh A's nearest even with the vote's exponential weights: one neighbour
    # is right for every query; nine outvote A's queries with B's.
    angles = [0, 1, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    labels = ["A", "A"] + ["B"] * 9
    vectors = np.array(
        [[np.cos(np.radians(a)), np.sin(np.radians(a))] for a in angles], dtype=np.float32
    )
    indices, sims = leave_one_out_neighbours(vectors, 9)
    chosen = choose_k(labels, indices, sims, [1, 9], validation_fraction=0.99)
    assert chosen["candidates"] == {"1": 1.0, "9": 9 / 11}  # A's two queries fail at k=9
    assert chosen["best_k"] == 1 and chosen["validation_queries"] == 11
    assert chosen["held_out_micro_f1"] is None  # nothing held out at this fraction
    half = choose_k(labels, indices, sims, [1, 9], groups=["p"] * 2 + [None] * 9, seed=3)
    assert half["validation_queries"] + half["held_out_queries"] == 11
    with pytest.raises(ValueError, match=r"1\.\.9"):
        choose_k(labels, indices, sims, [10])
