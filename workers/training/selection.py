"""Champion and challenger: when to train a new encoder, how to score it, and when it wins.

The live encoder (the champion) is replaced only by a challenger whose neighbours vote better
*the way the product votes*: each held-out image is given its k nearest labelled neighbours
among all the other labelled images, and the two encoders are compared on the same images by
two scores: the share of those neighbours that carry the image's label (its label match) and
whether their similarity-weighted vote is right (an abstention a miss). By default
(`judge_by="label-match"`) the challenger wins when a paired bootstrap interval of its label
match margin excludes 0 and its vote's accuracy is not clearly lower; with `judge_by="vote"`,
when the interval of its accuracy margin excludes 0. The interval is two-sided at
`confidence` (0.9): its lower bound is a one-sided test at 5 %, as promotion asks only whether
the challenger is better. Ten labels per image instead of one right-or-wrong vote: replaying
the round at 200 BUSI labels 12 times, the label match promoted 11 challengers, the accuracy
6, and all 11 were better on a validation fold (bench/judge_power.py, docs/retraining.md).

The held-out images are chosen by a stable hash of the patient (or, without patients, of the
task), so an image held out once is held out in every later round, and no patient the
champion was trained on (its training ids are recorded with it) is ever validated: neither
encoder under comparison has seen the images it is judged on. Within each class the hash draws
the same share, so the split is stratified in expectation; a class with too few held-out images
refuses the round instead of deciding on noise. (Topping a short class up by hash rank started
rounds sooner but lowered the 200-label replay: docs/retraining.md.)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from echolabel.settings import Settings
from echolabel.vote import vote
from vectorstore import Neighbour
from workers.evaluation.metrics import MISSING, leave_one_out_neighbours
from workers.training.samples import Sample, TrainingRefused, check_trainable, class_counts


@dataclass(frozen=True)
class RetrainPolicy:
    """When a challenger is trained and what it must show to be promoted."""

    # What `from_settings` fills defaults to the settings' own defaults: one source for each.
    enabled: bool = Settings.auto_retrain
    growth: float = Settings.retrain_growth  # labels grow by this share since the last decision
    min_per_class: int = Settings.min_per_class  # the guard-rail: images every class needs
    holdout_fraction: float = Settings.retrain_holdout
    min_holdout_per_class: int = 5
    k: int = Settings.top_k
    min_neighbours: int = Settings.min_neighbours
    min_score: float = Settings.min_score
    resamples: int = 2000
    confidence: float = Settings.retrain_confidence
    judge_by: str = Settings.retrain_judge  # one of JUDGES
    seed: int = 0

    def next_round_at(self, labelled_at_last_decision: int) -> int:
        """Labelled images at which the next round is due: `growth` more than at the last
        decision; before any, when two classes could pass the guard-rail."""
        if not labelled_at_last_decision:
            return 2 * self.min_per_class
        return int(np.ceil(labelled_at_last_decision * (1 + self.growth)))

    @classmethod
    def from_settings(cls, settings: Settings) -> RetrainPolicy:
        """The policy the backend runs: switch, growth, held-out share, guard-rail and vote from
        the settings."""
        return cls(
            enabled=settings.auto_retrain,
            growth=settings.retrain_growth,
            holdout_fraction=settings.retrain_holdout,
            min_per_class=settings.min_per_class,
            k=settings.top_k,
            min_neighbours=settings.min_neighbours,
            min_score=settings.min_score,
            judge_by=settings.retrain_judge,
            confidence=settings.retrain_confidence,
        )


# What a challenger's win is judged on (RetrainPolicy.judge_by, ECHOLABEL_RETRAIN_JUDGE).
JUDGES = ("label-match", "vote")


@dataclass(frozen=True)
class Due:
    """Whether a round should start now, and why (or why not)."""

    due: bool
    reason: str


def retraining_due(
    samples: Sequence[Sample],
    fields: Sequence[str],
    labelled_at_last_decision: int,
    policy: RetrainPolicy,
) -> Due:
    """A round is due when labels grew by `policy.growth` since the last decision (a promotion,
    a rejection or the project's first encoder) and every class passes the guard-rail."""
    if not policy.enabled:
        return Due(False, "automatic retraining is off (ECHOLABEL_AUTO_RETRAIN=0)")
    labelled = len(samples)
    needed = policy.next_round_at(labelled_at_last_decision)
    if labelled_at_last_decision and labelled < needed:
        return Due(
            False,
            f"{labelled} labelled images; the next round starts at {needed} "
            f"({policy.growth:.0%} more than the {labelled_at_last_decision} of the last decision)",
        )
    try:
        check_trainable(samples, fields, policy.min_per_class)
    except TrainingRefused as exc:
        return Due(False, str(exc).splitlines()[0])
    return Due(True, f"{labelled} labelled images, last decision at {labelled_at_last_decision}")


def held_out(key: str, fraction: float) -> bool:
    """Whether the image with this group key is held out: a stable hash, the same every round."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def challenge_split(
    samples: Sequence[Sample],
    fields: Sequence[str],
    policy: RetrainPolicy,
    never_validate: frozenset[str] = frozenset(),
) -> tuple[list[Sample], list[Sample]]:
    """(train, validation). A patient is wholly on one side (the patient key when the tasks
    carry one, else each image is its own patient). `never_validate` holds ids an encoder under
    comparison was trained on (the champion): a patient with any of them is never validated,
    and trains. An image with no single-choice label of these fields has nothing to be judged
    on: it is never validated (nor trained on, when the hash holds it out).

    Refuses (TrainingRefused) when a class of a field has fewer than
    `policy.min_holdout_per_class` held-out images."""
    patients: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        key = f"patient:{sample.group}" if sample.group else f"task:{sample.id}"
        patients[key].append(sample)
    held = {
        key
        for key, members in patients.items()
        if held_out(key, policy.holdout_fraction)
        and not any(s.id in never_validate for s in members)
    }
    validation = [
        s for key in patients if key in held for s in patients[key] if _single(s.labels, fields)
    ]
    held_counts = class_counts(validation, fields)
    for name, classes in class_counts(samples, fields).items():
        short = {c: held_counts[name].get(c, 0) for c in classes}
        short = {c: n for c, n in short.items() if n < policy.min_holdout_per_class}
        if short:
            listed = ", ".join(f"{c} ({n})" for c, n in short.items())
            raise TrainingRefused(
                f"field {name!r}: too few held-out images to judge a challenger: {listed}; "
                f"need {policy.min_holdout_per_class} per class"
            )
    held_ids = {s.id for key in held for s in patients[key]}
    return [s for s in samples if s.id not in held_ids], validation


@dataclass(frozen=True)
class HeldOutScores:
    """Per held-out image: the share of its labelled fields the product's vote gets right (an
    abstention is a miss), and the share of its k nearest labelled neighbours carrying its
    label (mean over those fields; a neighbour without that field's label does not match)."""

    correct: np.ndarray
    label_match: np.ndarray


def held_out_scores(
    vectors: np.ndarray,
    samples: Sequence[Sample],
    fields: Sequence[str],
    queries: Sequence[int],
    policy: RetrainPolicy,
) -> HeldOutScores:
    """How the product's neighbours serve each query row: they are the k nearest other labelled
    rows, never the query's own patient."""
    groups: list[Hashable | None] = [s.group for s in samples]
    indices, sims = leave_one_out_neighbours(vectors, policy.k, groups=groups)
    correct = np.zeros(len(queries))
    label_match = np.zeros(len(queries))
    for out, q in enumerate(queries):
        neighbours = [
            Neighbour(task=int(j), similarity=float(s), labels=_single(samples[j].labels, fields))
            for j, s in zip(indices[q], sims[q], strict=True)
            if j != MISSING
        ]
        votes = vote(
            neighbours, fields, min_neighbours=policy.min_neighbours, min_score=policy.min_score
        )
        truth = _single(samples[q].labels, fields)
        if not truth:  # no single-choice label of these fields: nothing to be right about
            continue
        correct[out] = np.mean([votes[f].label == label for f, label in truth.items()])
        label_match[out] = np.mean(
            [
                np.mean([n.labels.get(f) == label for n in neighbours]) if neighbours else 0.0
                for f, label in truth.items()
            ]
        )
    return HeldOutScores(correct=correct, label_match=label_match)


def _single(labels: Mapping[str, Any], fields: Sequence[str]) -> dict[str, str]:
    return {f: labels[f] for f in fields if isinstance(labels.get(f), str)}


@dataclass(frozen=True)
class Comparison:
    """Challenger against champion on the same held-out images: the vote's accuracy and the
    neighbours' label match, each with its margin (challenger - champion) and its paired
    bootstrap interval."""

    champion_accuracy: float
    challenger_accuracy: float
    margin: float
    interval: tuple[float, float]
    champion_label_match: float
    challenger_label_match: float
    label_match_margin: float
    label_match_interval: tuple[float, float]
    judge_by: str
    confidence: float
    images: int
    patients: int

    @property
    def challenger_wins(self) -> bool:
        if self.judge_by == "vote":
            return self.interval[0] > 0
        return self.label_match_interval[0] > 0 and self.vote_not_clearly_worse

    @property
    def vote_not_clearly_worse(self) -> bool:
        # On a few dozen images one miss moves the vote's margin by 0.03, so "not lower" kept
        # challengers whose label match had clearly won; a margin whose interval lies wholly
        # at or below 0 is "clearly worse".
        return self.margin >= 0 or self.interval[1] > 0

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "interval": list(self.interval),
            "label_match_interval": list(self.label_match_interval),
        }

    def explain(self) -> str:
        """One sentence: both scores, and why the challenger wins or not."""
        low, high = self.interval
        match_low, match_high = self.label_match_interval
        vote = (
            f"product vote {self.challenger_accuracy:.3f} vs {self.champion_accuracy:.3f}, "
            f"margin {self.margin:+.3f}, {self.confidence:.0%} interval [{low:+.3f}, {high:+.3f}]"
        )
        match = (
            f"label match {self.challenger_label_match:.3f} vs {self.champion_label_match:.3f}, "
            f"margin {self.label_match_margin:+.3f}, interval "
            f"[{match_low:+.3f}, {match_high:+.3f}]"
        )
        if self.judge_by == "vote":
            verdict = "the vote's interval " + (
                "excludes 0" if self.interval[0] > 0 else "includes 0 or lies below it"
            )
        elif self.challenger_wins:
            verdict = "the label match's interval excludes 0 and the vote is not clearly worse"
        elif match_low > 0:
            verdict = "the label match's interval excludes 0 but the vote's lies at or below 0"
        else:
            verdict = "the label match's interval includes 0 or lies below it"
        return (
            f"challenger vs champion on {self.images} held-out images: {match}; {vote}: {verdict}"
        )


def compare(
    champion: HeldOutScores,
    challenger: HeldOutScores,
    groups: Sequence[str | None],
    policy: RetrainPolicy,
) -> Comparison:
    """Paired bootstrap of both margins over held-out images (the same resamples for both),
    resampling patients (images of one patient are not independent) or images when there are
    no patients."""
    if policy.judge_by not in JUDGES:
        raise ValueError(f"judge_by must be one of {JUDGES}, got {policy.judge_by!r}")
    pairs = {
        "correct": (np.asarray(champion.correct, float), np.asarray(challenger.correct, float)),
        "label_match": (
            np.asarray(champion.label_match, float),
            np.asarray(challenger.label_match, float),
        ),
    }
    n = len(pairs["correct"][0])
    if not n or any(a.shape != (n,) or b.shape != (n,) for a, b in pairs.values()):
        raise ValueError("champion and challenger need one score per held-out image, same order")
    clusters: dict[str, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        clusters[group if group is not None else f"\0{i}"].append(i)
    members = list(clusters.values())
    sizes = np.array([len(m) for m in members])
    rng = np.random.default_rng(policy.seed)
    draws = rng.integers(0, len(members), size=(policy.resamples, len(members)))
    tail = (1 - policy.confidence) / 2
    margins, intervals = {}, {}
    for name, (before, after) in pairs.items():
        diff = after - before
        sums = np.array([diff[m].sum() for m in members])
        resampled = sums[draws].sum(axis=1) / sizes[draws].sum(axis=1)
        low, high = np.quantile(resampled, [tail, 1 - tail])
        margins[name], intervals[name] = float(diff.mean()), (float(low), float(high))
    return Comparison(
        champion_accuracy=float(pairs["correct"][0].mean()),
        challenger_accuracy=float(pairs["correct"][1].mean()),
        margin=margins["correct"],
        interval=intervals["correct"],
        champion_label_match=float(pairs["label_match"][0].mean()),
        challenger_label_match=float(pairs["label_match"][1].mean()),
        label_match_margin=margins["label_match"],
        label_match_interval=intervals["label_match"],
        judge_by=policy.judge_by,
        confidence=policy.confidence,
        images=n,
        patients=len(members),
    )


@dataclass
class Candidate:
    """One round's record: what was trained, how it scored, what was decided and why."""

    challenger: str | None
    champion: str
    labelled: int
    started_at: str
    decision: str  # "promoted", "kept", "refused", "failed", "rolled back", "centred"
    reason: str
    comparison: dict[str, Any] | None = None
    train_seconds: float | None = None
    score_seconds: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


class SelectionLog:
    """Per project, the live encoder's lineage and every round's record, in one JSON file under
    the artefacts directory (readable by the backend's admin page and by every worker)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, project: int | str) -> Path:
        return self.directory / f"project-{project}.json"

    def read(self, project: int | str) -> dict[str, Any]:
        """{live: {encoder, labelled, since} | None, lineage: [...], candidates: [...]}."""
        path = self._path(project)
        if not path.exists():
            return {"live": None, "lineage": [], "candidates": []}
        return json.loads(path.read_text())

    def all_projects(self) -> dict[str, dict[str, Any]]:
        """Every project's record, by project id."""
        if not self.directory.is_dir():
            return {}
        return {
            path.stem.removeprefix("project-"): json.loads(path.read_text())
            for path in sorted(self.directory.glob("project-*.json"))
        }

    def labelled_at_last_decision(self, project: int | str) -> int:
        """Labelled images when the last round ended, whatever its decision (a failure too: the
        next try waits for more labels instead of failing again at every check); 0 if none."""
        state = self.read(project)
        # Centring (label-free, not a round) leaves the loop's clock where it was.
        counts = [c["labelled"] for c in state["candidates"] if c["decision"] != "centred"]
        if state["live"]:
            counts.append(state["live"]["labelled"])
        return max(counts, default=0)

    def centred_before(self, project: int | str) -> bool:
        """Whether the project was ever switched (or tried to switch) to a centred encoder: the
        backend centres a project once, so a rollback from it stays."""
        return any(
            (c["challenger"] or "").startswith("centred:") for c in self.read(project)["candidates"]
        )

    def record(self, project: int | str, candidate: Candidate) -> None:
        """Append one round; a promotion or rollback also moves the live encoder."""
        state = self.read(project)
        clock = self.labelled_at_last_decision(project)
        state["candidates"].append(asdict(candidate))
        if candidate.decision in ("promoted", "rolled back", "centred") and candidate.challenger:
            # The encoder the project started with has no round of its own: it enters the
            # lineage when it is first replaced, so a rollback can return to it.
            replaced = state["live"] or {
                "encoder": candidate.champion,
                "labelled": 0,
                "since": None,
            }
            state["lineage"].append(replaced)
            state["live"] = {
                "encoder": candidate.challenger,
                "labelled": clock if candidate.decision == "centred" else candidate.labelled,
                "since": candidate.started_at,
            }
        self._write(project, state)

    def previous_encoder(self, project: int | str) -> str | None:
        """The encoder that was live before the current one (what a rollback returns to)."""
        state = self.read(project)
        live = state["live"]["encoder"] if state["live"] else None
        for entry in reversed(state["lineage"]):
            if entry["encoder"] != live:
                return entry["encoder"]
        return None

    def _write(self, project: int | str, state: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(project)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path)  # readers never see half a record
