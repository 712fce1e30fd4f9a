"""What an encoder is trained on: labelled images, their class counts, the minimum per class,
and the validation split (patient-disjoint when patients are known)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from echolabel.vote import is_multi_choice


@dataclass(frozen=True)
class Sample:
    """One labelled image to train on: a stable id, where to read it, its labels, its patient."""

    id: str  # task id or path relative to the folder
    ref: str  # image reference the ImageFetcher reads
    labels: dict[str, str | list[str]] = field(default_factory=dict)  # list: multi-choice
    group: str | None = None  # patient / study id
    role: str = "train"  # "train" or "validation" (a validation split given by the data)


class TrainingRefused(ValueError):
    """The labelled data cannot train an encoder (too few images of some class, no labels)."""


def class_counts(samples: Sequence[Sample], fields: Sequence[str]) -> dict[str, dict[str, int]]:
    """Labelled images per class, per field, largest class first."""
    return {
        name: dict(Counter(s.labels[name] for s in samples if s.labels.get(name)).most_common())
        for name in fields
    }


def format_counts(counts: Mapping[str, Mapping[str, int]]) -> str:
    """`finding: benign 350, malignant 168, normal 106` (one line per field)."""
    return "\n".join(
        f"  {name}: " + ", ".join(f"{cls} {n}" for cls, n in classes.items())
        for name, classes in counts.items()
    )


def check_trainable(samples: Sequence[Sample], fields: Sequence[str], min_per_class: int) -> None:
    """Refuse (TrainingRefused, listing every class count) unless each field is single-choice
    with 2+ classes and every class at least `min_per_class` labelled images."""
    if not fields:
        raise TrainingRefused("no label field to train on: name at least one choices field")
    multi = [name for name in fields if is_multi_choice(s.labels.get(name) for s in samples)]
    if multi:
        raise TrainingRefused(
            f"refusing to train on {', '.join(multi)}: multi-choice field(s) (a label is a list "
            "of choices), and the encoder trains one single-label head per field; name "
            "single-choice fields only (--field)"
        )
    counts = class_counts(samples, fields)
    problems = []
    for name, classes in counts.items():
        if len(classes) < 2:
            problems.append(f"field {name!r} has {len(classes)} class(es): need 2 or more")
        small = {cls: n for cls, n in classes.items() if n < min_per_class}
        if small:
            listed = ", ".join(f"{cls} ({n})" for cls, n in small.items())
            problems.append(f"field {name!r}: {listed} below {min_per_class}")
    if problems:
        raise TrainingRefused(
            f"refusing to train: every class needs at least {min_per_class} labelled images "
            "(ECHOLABEL_MIN_PER_CLASS / --min-per-class); "
            + "; ".join(problems)
            + f"\nlabelled images per class:\n{format_counts(counts)}\n"
            "Label more images of the small classes, or leave their field out (--field)."
        )


def validation_split(
    samples: Sequence[Sample], fields: Sequence[str], fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """(train, validation) from samples of role "train" (those of role "validation" go to
    validation as they are).

    With patient ids, whole patients go to validation (no patient on both sides), picked in a
    seeded random order until the validation share of each class of the first field reaches
    `fraction`; else a stratified random `fraction` of each class of the first field.
    """
    given = [s for s in samples if s.role == "validation"]
    pool = [s for s in samples if s.role != "validation"]
    if given or fraction <= 0:
        return pool, given
    rng = np.random.default_rng(seed)
    key = fields[0]
    if any(s.group for s in pool):
        by_group: dict[str, list[Sample]] = defaultdict(list)
        for s in pool:
            # An image without a patient id is its own patient.
            by_group[s.group or f"\0{s.id}"].append(s)
        wanted = {cls: fraction * n for cls, n in Counter(s.labels.get(key) for s in pool).items()}
        taken: Counter[str | None] = Counter()
        held: set[str] = set()
        for index in rng.permutation(len(by_group)):
            group = sorted(by_group)[index]
            members = by_group[group]
            adds = Counter(s.labels.get(key) for s in members)
            # Take the patient if one of its classes is still short of its share.
            if any(taken[c] < wanted[c] for c in adds):
                held.add(group)
                taken.update(adds)
            if all(taken[c] >= wanted[c] for c in wanted):
                break
        validation = [s for g in sorted(held) for s in by_group[g]]
    else:
        by_class: dict[str | None, list[Sample]] = defaultdict(list)
        for s in pool:
            by_class[s.labels.get(key)].append(s)
        validation = []
        for cls in sorted(by_class, key=str):
            members = by_class[cls]
            count = max(1, round(fraction * len(members))) if len(members) > 1 else 0
            validation += [members[i] for i in rng.permutation(len(members))[:count]]
    chosen = {s.id for s in validation}
    return [s for s in pool if s.id not in chosen], validation
