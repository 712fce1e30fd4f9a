"""The learning curve with the self-improving loop in it: replay an annotation session, and
wherever the retraining policy would start a round, train a challenger on the labels revealed
so far, judge it exactly as the backend does (`workers.training.selection`), and continue with
its vectors only if it was promoted.

Accuracy and coverage are measured as in `learning_curve.replay`: after each batch, on the
tasks not labelled yet, voted by their k nearest labelled tasks. Rounds happen at the policy's
points (labels grown by `policy.growth` since the last decision, every class past the
guard-rail), which need not be the curve's points, so the session steps to whichever comes
first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from echolabel.diversity import k_center_order
from workers.training.samples import Sample, TrainingRefused, check_trainable
from workers.training.selection import (
    RetrainPolicy,
    challenge_split,
    compare,
    held_out_scores,
)

from .learning_curve import _suggestions

log = logging.getLogger(__name__)

# Trains a challenger on these rows (their labels) and returns every row's vector under it.
Retrain = Callable[[Sequence[int]], np.ndarray]
RETRAINING_ORDERS = ("random", "diverse_first")


def replay_sessions(orders: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int]]:
    """(order, seed) of each session to replay. The diverse-first order (k-center greedy over
    the vectors) and the training recipe ignore the seed, so that order runs once: another
    seed would repeat the same hour of training for the same numbers."""
    seeds = list(seeds)
    return [(o, s) for o in orders for s in (seeds if o == "random" else seeds[:1])]


def replay_retraining(
    vectors: np.ndarray,
    labels: Mapping[str, Sequence[str | None]],
    retrain: Retrain,
    *,
    order: str,
    seed: int,
    sizes: Sequence[int],
    policy: RetrainPolicy,
    groups: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """{points: [{labelled, fields: {field: {voted, coverage, accuracy, right_rate}},
    frozen: (the same on the starting vectors), promotions}],
    rounds: [{labelled, decision, reason, comparison, seconds}]}."""
    if order not in RETRAINING_ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {RETRAINING_ORDERS}")
    n = len(vectors)
    if not sizes or sorted(sizes) != list(sizes) or sizes[0] < 1 or sizes[-1] >= n:
        raise ValueError(f"sizes must increase within 1..{n - 1}, got {list(sizes)}")
    groups = list(groups) if groups is not None else [None] * n
    rng = np.random.default_rng(seed)
    sequence = (
        rng.permutation(n) if order == "random" else k_center_order(vectors, limit=sizes[-1])
    )[: sizes[-1]]
    frozen = current = np.asarray(vectors, dtype=np.float32)
    promoted = 0
    last_decision = 0
    rounds: list[dict[str, Any]] = []
    points: list[dict[str, Any]] = []
    labelled = 0
    for target in sizes:
        while labelled < target:
            # The backend's timer: the first round at `next_round_at(0)` (twice the
            # guard-rail), then at `growth` more than the last decision.
            due_at = policy.next_round_at(last_decision)
            # Step to the curve's next point, or to the policy's next point if it comes first.
            labelled = due_at if labelled < due_at < target else target
            if policy.enabled and labelled >= due_at:
                rows = [int(r) for r in sequence[:labelled]]
                outcome = _round(current, labels, groups, rows, retrain, policy)
                rounds.append({"labelled": labelled, **outcome["record"]})
                # A full replay takes an hour on two cores: each round is logged as it ends.
                log.info(
                    "retraining replay round",
                    extra={"order": order, "seed": seed, **rounds[-1]},
                )
                last_decision = labelled
                if "vectors" in outcome:
                    current = outcome["vectors"]
                    promoted += 1
        revealed = np.zeros(n, dtype=bool)
        revealed[sequence[:labelled]] = True
        point: dict[str, Any] = {
            "labelled": labelled,
            "fields": _measure(current, labels, revealed, policy),
            "promotions": promoted,
        }
        # The same session on the starting (frozen) vectors: the baseline at the same labels.
        point["frozen"] = (
            _measure(frozen, labels, revealed, policy) if promoted else point["fields"]
        )
        points.append(point)
        log.info("retraining replay point", extra={"order": order, "seed": seed, **point})
    return {"order": order, "seed": seed, "points": points, "rounds": rounds}


def _measure(
    vectors: np.ndarray,
    labels: Mapping[str, Sequence[str | None]],
    revealed: np.ndarray,
    policy: RetrainPolicy,
) -> dict[str, dict[str, Any]]:
    """Per field, on the tasks not revealed yet: {voted, coverage, accuracy, right_rate}."""
    votes, _ = _suggestions(
        vectors, labels, revealed, policy.k, policy.min_neighbours, policy.min_score, None
    )
    per_field = {}
    for name, truth in labels.items():
        measured = [i for i in np.flatnonzero(~revealed) if truth[i] is not None]
        voted = [i for i in measured if votes[i][name].label is not None]
        correct = sum(votes[i][name].label == truth[i] for i in voted)
        per_field[name] = {
            "voted": len(voted),
            "coverage": len(voted) / len(measured) if measured else None,
            "accuracy": correct / len(voted) if voted else None,
            # Abstentions counted as misses, as the product's headline figure does.
            "right_rate": correct / len(measured) if measured else None,
        }
    return per_field


def _round(
    current: np.ndarray,
    labels: Mapping[str, Sequence[str | None]],
    groups: Sequence[str | None],
    rows: Sequence[int],
    retrain: Retrain,
    policy: RetrainPolicy,
) -> dict[str, Any]:
    """One round on the revealed rows: refused, kept, or promoted (with the new vectors)."""
    fields = list(labels)
    samples = [
        Sample(
            id=str(r),
            ref="",
            labels={f: labels[f][r] for f in fields if labels[f][r] is not None},
            group=groups[r],
        )
        for r in rows
    ]
    try:
        check_trainable(samples, fields, policy.min_per_class)
        train, validation = challenge_split(samples, fields, policy)
    except TrainingRefused as exc:
        return {"record": {"decision": "refused", "reason": str(exc).splitlines()[0]}}
    started = time.monotonic()
    try:
        challenger = retrain([int(s.id) for s in train])
    except TrainingRefused as exc:
        # The trainer's own guard-rail counts the training part only, after the hold-out: a
        # class with just over `min_per_class` labels passes above and fails here.
        return {"record": {"decision": "refused", "reason": str(exc).splitlines()[0]}}
    seconds = time.monotonic() - started
    held = {s.id for s in validation}
    queries = [i for i, s in enumerate(samples) if s.id in held]
    revealed = list(rows)
    champion_scores = held_out_scores(current[revealed], samples, fields, queries, policy)
    challenger_scores = held_out_scores(challenger[revealed], samples, fields, queries, policy)
    comparison = compare(
        champion_scores, challenger_scores, [samples[q].group for q in queries], policy
    )
    record = {
        "decision": "promoted" if comparison.challenger_wins else "kept",
        "comparison": comparison.as_dict(),
        "trained_on": len(train),
        "seconds": round(seconds, 1),
    }
    out: dict[str, Any] = {"record": record}
    if comparison.challenger_wins:
        out["vectors"] = np.asarray(challenger, dtype=np.float32)
    return out


def retraining_table(block: Mapping[str, Any]) -> str:
    """A markdown table of the replayed sessions: per order and curve point, the mean over
    seeds of each field's right rate (abstentions as misses), accuracy and coverage, with the
    loop and on the frozen starting vectors, and the promotions so far; then every round's
    decision."""
    sessions = block["sessions"]
    lines = [
        "| order | labelled | field | right rate | accuracy | coverage | frozen: right rate "
        "| accuracy | coverage | promotions |"
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for order in dict.fromkeys(s["order"] for s in sessions):
        runs = [s for s in sessions if s["order"] == order]
        for step, point in enumerate(runs[0]["points"]):
            for name in point["fields"]:
                cells = []
                for encoder in ("fields", "frozen"):
                    for measure in ("right_rate", "accuracy", "coverage"):
                        values = [
                            r["points"][step].get(encoder, r["points"][step]["fields"])[name][
                                measure
                            ]
                            for r in runs
                        ]
                        kept = [v for v in values if v is not None]
                        cells.append(f"{np.mean(kept):.3f}" if kept else "—")
                promotions = np.mean([r["points"][step]["promotions"] for r in runs])
                lines.append(
                    f"| {order} | {point['labelled']} | {name} | "
                    + " | ".join(cells)
                    + f" | {promotions:g} |"
                )
    for session in sessions:
        decided = [
            f"{r['labelled']}: {r['decision']}"
            + (f" ({r['comparison']['margin']:+.3f})" if "comparison" in r else "")
            for r in session["rounds"]
        ]
        lines.append(f"\n{session['order']} seed {session['seed']}: " + "; ".join(decided))
    return "\n".join(lines)
