"""The diverse-first order (k-center greedy, cosine) on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from echolabel.diversity import k_center_order, rank_scores
from tests.helpers import three_clusters


def naive_order(x: np.ndarray, seeds: list[int]) -> list[int]:
    """Farthest-first traversal written out: max over candidates of min over chosen."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    chosen = list(seeds)
    if not chosen:
        chosen = [int(np.argmax(x @ x.mean(axis=0)))]
        order = list(chosen)
    else:
        order = []
    while len(chosen) < len(x):
        candidates = [i for i in range(len(x)) if i not in chosen]
        best = max(candidates, key=lambda i: (min(1 - x[i] @ x[j] for j in chosen), -i))
        chosen.append(best)
        order.append(best)
    return order


def test_the_first_three_picks_cover_the_three_clusters():
    x, cluster = three_clusters()
    order = k_center_order(x)
    assert sorted(cluster[order[:3]]) == [0, 1, 2]
    # Started from the most typical task: the big cluster's, nearest the centroid.
    assert order[0] == int(np.argmax(x @ x.mean(axis=0) / np.linalg.norm(x, axis=1)))
    assert cluster[order[0]] == 0
    assert sorted(order.tolist()) == list(range(len(x)))


def test_labelled_tasks_seed_the_traversal_and_are_never_returned():
    x, cluster = three_clusters()
    labelled = np.flatnonzero(cluster == 0)[:4]
    order = k_center_order(x, labelled)
    assert set(order.tolist()) == set(range(len(x))) - set(labelled.tolist())
    assert sorted(cluster[order[:2]]) == [1, 2]  # what the labels do not cover comes first
    mask = np.zeros(len(x), dtype=bool)
    mask[labelled] = True
    assert np.array_equal(k_center_order(x, mask), order)


def test_it_equals_the_written_out_traversal():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 5)).astype(np.float32)
    assert k_center_order(x).tolist() == naive_order(x, [])
    assert k_center_order(x, [7, 21]).tolist() == naive_order(x, [7, 21])


def test_the_order_is_prefix_consistent():
    """Labelling the first m of the order and asking again gives the rest of the same order."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((60, 6))
    order = k_center_order(x)
    for m in (1, 5, 20):
        assert np.array_equal(k_center_order(x, order[:m]), order[m:])


def test_limit_keeps_the_greedy_prefix_and_sorts_the_rest_by_distance():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 4))
    full = k_center_order(x)
    short = k_center_order(x, limit=10)
    assert np.array_equal(short[:10], full[:10])
    assert sorted(short.tolist()) == list(range(50))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    distance = 1 - (xn[short[10:]] @ xn[short[:10]].T).max(axis=1)
    assert np.all(np.diff(distance) <= 1e-12)


def test_edge_cases():
    x, _ = three_clusters(sizes=(2, 1, 1))
    assert k_center_order(x, np.arange(4)).tolist() == []
    assert k_center_order(x[:1]).tolist() == [0]
    assert k_center_order(np.zeros((3, 4))).tolist() == [0, 1, 2]  # no direction: row order
    with pytest.raises(ValueError, match=r"0\.\.3"):
        k_center_order(x, [4])
    with pytest.raises(ValueError, match="n × d"):
        k_center_order(np.zeros(4))


def test_rank_scores_increase_below_one():
    scores = rank_scores(4)
    assert scores.tolist() == [0.0, 0.25, 0.5, 0.75]
    assert rank_scores(0).tolist() == []
