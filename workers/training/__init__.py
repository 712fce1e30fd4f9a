"""Training an encoder on a project's own labels (`echolabel train-encoder`).

The trainer (torch, timm) is imported when first asked for, so that importing the policy
(`selection`) or the samples does not.
"""

from typing import Any

from workers.training.samples import Sample, TrainingRefused, check_trainable, class_counts

_TRAINER = ("TrainingProgress", "TrainOptions", "train_encoder")


def __getattr__(name: str) -> Any:
    if name in _TRAINER:
        from workers.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Sample",
    "TrainOptions",
    "TrainingProgress",
    "TrainingRefused",
    "check_trainable",
    "class_counts",
    "train_encoder",
]
