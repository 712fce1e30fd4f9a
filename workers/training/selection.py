"""Champion and challenger: when to train a new encoder, how to score it, and when it wins.

The live encoder (the champion) is replaced only by a challenger that votes better *the way the
product votes*: each held-out image gets the similarity-weighted vote of its k nearest labelled
neighbours among all the other labelled images, abstentions count as misses, and the two
encoders are compared on the same images. The challenger wins only when a paired bootstrap
interval of its margin excludes 0.

The held-out images are chosen by a stable hash of the patient (or, without patients, of the
task), so an image held out once is held out in every later round: no encoder this loop trains,
champion included, ever sees the images it is judged on. Within each class the hash draws the
same share, so the split is stratified in expectation; a class with too few held-out images
refuses the round instead of deciding on noise.
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
    confidence: float = 0.95
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
        )


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
    comparison was already trained on (the champion, when someone trained it by hand): they
    are never validated, and stay in training.

    Refuses (TrainingRefused) when a class of a field has fewer than
    `policy.min_holdout_per_class` held-out images."""
    train, validation = [], []
    for sample in samples:
        if sample.id in never_validate:
            continue
        key = f"patient:{sample.group}" if sample.group else f"task:{sample.id}"
        (validation if held_out(key, policy.holdout_fraction) else train).append(sample)
    held = class_counts(validation, fields)
    for name, classes in class_counts(samples, fields).items():
        short = {c: held[name].get(c, 0) for c in classes}
        short = {c: n for c, n in short.items() if n < policy.min_holdout_per_class}
        if short:
            listed = ", ".join(f"{c} ({n})" for c, n in short.items())
            raise TrainingRefused(
                f"field {name!r}: too few held-out images to judge a challenger: {listed}; "
                f"need {policy.min_holdout_per_class} per class"
            )
    trained_on_before = [s for s in samples if s.id in never_validate]
    return train + trained_on_before, validation


def product_vote_correct(
    vectors: np.ndarray,
    samples: Sequence[Sample],
    fields: Sequence[str],
    queries: Sequence[int],
    policy: RetrainPolicy,
) -> np.ndarray:
    """Per query row, the share of `fields` the product's vote gets right (an abstention is a
    miss): neighbours are the k nearest other labelled rows, never the query's own patient."""
    groups: list[Hashable | None] = [s.group for s in samples]
    is_query = np.zeros(len(samples), dtype=bool)
    is_query[list(queries)] = True
    indices, sims = leave_one_out_neighbours(vectors, policy.k, groups=groups)
    correct = np.zeros(len(queries))
    for out, q in enumerate(queries):
        neighbours = [
            Neighbour(task=int(j), similarity=float(s), labels=_single(samples[j].labels, fields))
            for j, s in zip(indices[q], sims[q], strict=True)
            if j != MISSING
        ]
        votes = vote(
            neighbours, fields, min_neighbours=policy.min_neighbours, min_score=policy.min_score
        )
        truth = samples[q].labels
        correct[out] = np.mean([votes[f].label == truth.get(f) for f in fields])
    return correct


def _single(labels: Mapping[str, Any], fields: Sequence[str]) -> dict[str, str]:
    return {f: labels[f] for f in fields if isinstance(labels.get(f), str)}


@dataclass(frozen=True)
class Comparison:
    """Challenger against champion on the same held-out images."""

    champion_accuracy: float
    challenger_accuracy: float
    margin: float  # challenger - champion
    interval: tuple[float, float]  # paired bootstrap interval of the margin
    confidence: float
    images: int
    patients: int

    @property
    def challenger_wins(self) -> bool:
        return self.interval[0] > 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "interval": list(self.interval)}


def compare(
    champion: np.ndarray,
    challenger: np.ndarray,
    groups: Sequence[str | None],
    policy: RetrainPolicy,
) -> Comparison:
    """Paired bootstrap of the accuracy margin over held-out images, resampling patients
    (images of one patient are not independent) or images when there are no patients."""
    champion = np.asarray(champion, dtype=float)
    challenger = np.asarray(challenger, dtype=float)
    if champion.shape != challenger.shape or champion.ndim != 1 or not len(champion):
        raise ValueError("champion and challenger need one score per held-out image, same order")
    clusters: dict[str, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        clusters[group if group is not None else f"\0{i}"].append(i)
    members = list(clusters.values())
    diff = challenger - champion
    sums = np.array([diff[m].sum() for m in members])
    sizes = np.array([len(m) for m in members])
    rng = np.random.default_rng(policy.seed)
    draws = rng.integers(0, len(members), size=(policy.resamples, len(members)))
    margins = sums[draws].sum(axis=1) / sizes[draws].sum(axis=1)
    tail = (1 - policy.confidence) / 2
    low, high = np.quantile(margins, [tail, 1 - tail])
    return Comparison(
        champion_accuracy=float(champion.mean()),
        challenger_accuracy=float(challenger.mean()),
        margin=float(diff.mean()),
        interval=(float(low), float(high)),
        confidence=policy.confidence,
        images=len(diff),
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
