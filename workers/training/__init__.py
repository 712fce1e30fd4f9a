"""Training an encoder on a project's own labels (`echolabel train-encoder`).

The trainer (torch, timm) is imported when first asked for, so that importing the policy
(`selection`), the samples or the options does not.
"""

from typing import Any

from workers.training.options import TrainOptions
from workers.training.progress import TrainingProgress
from workers.training.samples import Sample, TrainingRefused, check_trainable, class_counts


def __getattr__(name: str) -> Any:
    if name == "train_encoder":
        from workers.training.trainer import train_encoder

        return train_encoder
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
