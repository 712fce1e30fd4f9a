"""Champion/challenger selection: the held-out split, the product's vote, the bootstrap, the log."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from workers.training.samples import Sample, TrainingRefused
from workers.training.selection import (
    Candidate,
    HeldOutScores,
    RetrainPolicy,
    SelectionLog,
    challenge_split,
    compare,
    held_out,
    held_out_scores,
    retraining_due,
)

FIELDS = ["finding"]


def samples(n: int, classes: tuple[str, ...] = ("a", "b"), patients: int = 0) -> list[Sample]:
    return [
        Sample(
            id=str(i),
            ref=f"img/{i}.png",
            labels={"finding": classes[i % len(classes)]},
            group=f"p{i % patients}" if patients else None,
        )
        for i in range(n)
    ]


def test_held_out_is_stable_and_draws_the_share() -> None:
    keys = [f"task:{i}" for i in range(4000)]
    first = [held_out(k, 0.2) for k in keys]
    assert first == [held_out(k, 0.2) for k in keys]
    assert 0.18 < np.mean(first) < 0.22
    # A larger share only adds images: nothing held out before is trained on later.
    larger = [held_out(k, 0.3) for k in keys]
    assert all(b for a, b in zip(first, larger, strict=True) if a)


def test_split_keeps_patients_whole_and_is_the_same_as_labels_grow() -> None:
    policy = RetrainPolicy(min_holdout_per_class=1)
    small = samples(300, patients=60)
    train, validation = challenge_split(small, FIELDS, policy)
    assert {s.group for s in train}.isdisjoint({s.group for s in validation})
    assert len(train) + len(validation) == 300
    grown_train, grown_validation = challenge_split(samples(600, patients=60), FIELDS, policy)
    assert {s.id for s in validation} <= {s.id for s in grown_validation}
    assert not {s.id for s in validation} & {s.id for s in grown_train}


def test_split_never_validates_what_the_champion_trained_on() -> None:
    pool = samples(400)
    seen = frozenset(str(i) for i in range(0, 400, 4))
    train, validation = challenge_split(pool, FIELDS, RetrainPolicy(), never_validate=seen)
    assert not {s.id for s in validation} & seen
    assert seen <= {s.id for s in train}


def test_split_refuses_a_class_with_too_few_held_out_images() -> None:
    pool = samples(40, classes=("a", "a", "a", "a", "a", "a", "a", "b"))
    with pytest.raises(TrainingRefused, match=r"'finding'.*b \(\d\).*need 5 per class"):
        challenge_split(pool, FIELDS, RetrainPolicy(min_holdout_per_class=5))


def test_a_patient_the_champion_saw_is_never_validated() -> None:
    pool = samples(400, patients=40)
    policy = RetrainPolicy()
    patient = next(s.group for s in pool if held_out(f"patient:{s.group}", 0.2))
    seen = frozenset({next(s.id for s in pool if s.group == patient)})  # one of its images
    _, validation = challenge_split(pool, FIELDS, policy, never_validate=seen)
    assert validation and patient not in {s.group for s in validation}


def test_an_image_with_nothing_to_judge_is_never_validated() -> None:
    pool = samples(400) + [Sample(id=f"x{i}", ref="", labels={"organ": "liver"}) for i in range(50)]
    train, validation = challenge_split(pool, FIELDS, RetrainPolicy())
    assert validation and all("finding" in s.labels for s in validation)
    assert len(train) + len(validation) <= len(pool)


def test_held_out_scores_count_abstentions_as_misses_and_match_each_neighbour() -> None:
    # Two tight clusters, by hand: rows 0-3 near e1 ("a"), rows 4-7 near e2 ("b").
    vectors = np.array(
        [[1, 0.01 * i, 0] for i in range(4)] + [[0, 1, 0.01 * i] for i in range(4)], dtype=float
    )
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    pool = [Sample(id=str(i), ref="", labels={"finding": "a" if i < 4 else "b"}) for i in range(8)]
    policy = RetrainPolicy(k=3, min_neighbours=3, min_score=0.7)
    clean = held_out_scores(vectors, pool, FIELDS, [0, 5], policy)
    assert clean.correct.tolist() == [1.0, 1.0] and clean.label_match.tolist() == [1.0, 1.0]
    # One of row 0's three neighbours relabelled: the winner's share, 2/3, is under 0.7 → a
    # miss; two of its three neighbours still carry its label.
    mixed = list(pool)
    mixed[1] = Sample(id="1", ref="", labels={"finding": "b"})
    scores = held_out_scores(vectors, mixed, FIELDS, [0], policy)
    assert scores.correct.tolist() == [0.0]
    assert scores.label_match.tolist() == pytest.approx([2 / 3])
    # Too few neighbours (k=2 < min_neighbours=3) → abstain → a miss; both neighbours match.
    few = RetrainPolicy(k=2, min_neighbours=3, min_score=0.5)
    scores = held_out_scores(vectors, pool, FIELDS, [0], few)
    assert scores.correct.tolist() == [0.0] and scores.label_match.tolist() == [1.0]
    # A second field only some images are labelled for: an image is scored on its own labels,
    # and a neighbour without the field's label does not match.
    two = [
        Sample(id=s.id, ref="", labels={**s.labels, "plane": "x"} if s.id in "013" else s.labels)
        for s in pool
    ]
    scores = held_out_scores(vectors, two, [*FIELDS, "plane"], [0, 2], policy)
    # Row 0: "x" carried by 2 of its 3 neighbours: support 2 < 3 → abstains, a miss.
    # Row 2 has no plane: its neighbours' unanimous "x" is neither right nor wrong for it.
    assert scores.correct.tolist() == [0.5, 1.0]
    assert scores.label_match.tolist() == pytest.approx([(1 + 2 / 3) / 2, 1.0])


def scores(correct: np.ndarray, label_match: np.ndarray | None = None) -> HeldOutScores:
    return HeldOutScores(correct, correct if label_match is None else label_match)


@pytest.mark.parametrize("judge", ["label-match", "vote"])
def test_compare_promotes_only_a_clear_winner(judge: str) -> None:
    policy = RetrainPolicy(judge_by=judge)
    rng = np.random.default_rng(0)
    champion = (rng.random(300) < 0.7).astype(float)
    groups = [None] * 300
    same = compare(scores(champion), scores(champion.copy()), groups, policy)
    assert same.margin == 0 and same.label_match_margin == 0 and not same.challenger_wins
    better = champion.copy()
    better[np.flatnonzero(champion == 0)[:45]] = 1  # +15 points
    won = compare(scores(champion), scores(better), groups, policy)
    assert won.challenger_wins and won.interval[0] > 0 and won.margin == pytest.approx(0.15)
    assert "excludes 0" in won.explain()
    # As good, right on other images: no promotion.
    shuffled = compare(scores(champion), scores(rng.permutation(champion)), groups, policy)
    assert shuffled.margin == 0 and shuffled.interval[0] < 0 < shuffled.interval[1]
    assert not shuffled.challenger_wins


def test_label_match_wins_only_where_the_vote_is_not_clearly_worse() -> None:
    # Neighbours match the image's label more often with the challenger, clearly (+0.1 on
    # every image), while its vote's accuracy moves by a few images either way, or falls.
    rng = np.random.default_rng(1)
    match = rng.uniform(0.3, 0.8, 200)
    correct = (rng.random(200) < 0.7).astype(float)
    better_match = match + 0.1
    right, wrong = np.flatnonzero(correct == 1), np.flatnonzero(correct == 0)
    up, down, fallen = correct.copy(), correct.copy(), correct.copy()
    up[wrong[:4]], up[right[:2]] = 1, 0  # 2 images more
    down[wrong[:2]], down[right[:4]] = 1, 0  # 2 images fewer: within the vote's noise
    fallen[right[:30]] = 0  # 30 images fewer
    champion = scores(correct, match)
    for vote in (up, down):
        wins = compare(champion, scores(vote, better_match), [None] * 200, RetrainPolicy())
        assert wins.label_match_interval[0] > 0 and wins.interval[0] < 0 < wins.interval[1]
        assert wins.challenger_wins and "not clearly worse" in wins.explain()
    worse_vote = compare(champion, scores(fallen, better_match), [None] * 200, RetrainPolicy())
    assert worse_vote.label_match_interval[0] > 0 and worse_vote.interval[1] < 0
    assert (
        not worse_vote.challenger_wins and "the vote's lies at or below 0" in worse_vote.explain()
    )
    # Judged by the vote alone, neither wins: its interval includes 0.
    assert not compare(
        champion, scores(up, better_match), [None] * 200, RetrainPolicy(judge_by="vote")
    ).challenger_wins
    # At the edge: a lower vote whose interval tops out at 0 is clearly worse; the same votes
    # on every image (margin and interval 0) are not.
    edge = dataclasses.replace(wins, margin=-0.05, interval=(-0.105, 0.0))
    assert not edge.vote_not_clearly_worse and not edge.challenger_wins
    assert "the vote's lies at or below 0" in edge.explain()
    same_votes = dataclasses.replace(wins, margin=0.0, interval=(0.0, 0.0))
    assert same_votes.vote_not_clearly_worse and same_votes.challenger_wins
    with pytest.raises(ValueError, match="judge_by"):
        compare(champion, champion, [None] * 200, RetrainPolicy(judge_by="head"))


def test_confidence_sets_how_clear_a_win_must_be() -> None:
    # 14 images better, 6 worse, 80 the same: 1.8 standard errors, which a one-sided test at
    # 5 % (the 90 % interval's lower bound) finds and the 95 % interval's does not.
    champion = np.zeros(100)
    challenger = np.zeros(100)
    challenger[:14] = 1
    challenger[14:20] = -1
    groups = [None] * 100
    policies = {c: RetrainPolicy(confidence=c) for c in (0.9, 0.95)}
    results = {
        c: compare(scores(champion), scores(challenger), groups, p) for c, p in policies.items()
    }
    assert results[0.9].label_match_interval[0] > 0 >= results[0.95].label_match_interval[0]
    assert results[0.9].challenger_wins and not results[0.95].challenger_wins
    assert RetrainPolicy().confidence == 0.9 and "90% interval" in results[0.9].explain()


def test_compare_resamples_patients_not_images() -> None:
    # 10 patients of 30 images each: the margin lives in 2 patients only, so resampling
    # patients must give a wider interval than pretending the 300 images are independent.
    champion = np.zeros(300)
    challenger = np.zeros(300)
    challenger[:60] = 1
    by_image = compare(scores(champion), scores(challenger), [None] * 300, RetrainPolicy())
    by_patient = compare(
        scores(champion), scores(challenger), [f"p{i // 30}" for i in range(300)], RetrainPolicy()
    )
    assert by_patient.patients == 10 and by_image.patients == 300
    width = lambda c: c.label_match_interval[1] - c.label_match_interval[0]  # noqa: E731
    assert width(by_patient) > 2 * width(by_image)


def test_retraining_due_on_growth_and_guard_rail() -> None:
    policy = RetrainPolicy(growth=0.25, min_per_class=20)
    assert retraining_due(samples(100), FIELDS, 0, policy).due
    waiting = retraining_due(samples(120), FIELDS, 100, policy)
    assert not waiting.due and "starts at 125" in waiting.reason
    assert retraining_due(samples(125), FIELDS, 100, policy).due
    short = retraining_due(samples(30), FIELDS, 0, policy)
    assert not short.due and "below 20" in short.reason
    off = retraining_due(samples(500), FIELDS, 0, RetrainPolicy(enabled=False))
    assert not off.due and "ECHOLABEL_AUTO_RETRAIN" in off.reason


def test_selection_log_tracks_live_encoder_and_rollback_target(tmp_path) -> None:
    log = SelectionLog(tmp_path / "selection")
    assert log.labelled_at_last_decision(3) == 0 and log.previous_encoder(3) is None

    def round_(challenger: str, decision: str, labelled: int) -> Candidate:
        return Candidate(
            challenger=challenger,
            champion="x",
            labelled=labelled,
            started_at="2026-12-06T00:00:00Z",
            decision=decision,
            reason="test",
        )

    log.record(3, round_("trained:p-v1", "promoted", 100))
    log.record(3, round_("trained:p-v2", "kept", 130))
    assert log.read(3)["live"]["encoder"] == "trained:p-v1"
    assert log.labelled_at_last_decision(3) == 130
    log.record(3, round_("trained:p-v3", "failed", 170))
    assert log.labelled_at_last_decision(3) == 170  # a failure waits for more labels too
    assert log.previous_encoder(3) == "x"  # the encoder the project started with
    log.record(3, round_("trained:p-v3", "promoted", 170))
    assert log.previous_encoder(3) == "trained:p-v1"
    assert [c["decision"] for c in log.read(3)["candidates"]] == [
        "promoted",
        "kept",
        "failed",
        "promoted",
    ]
