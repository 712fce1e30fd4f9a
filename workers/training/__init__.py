"""Training an encoder on a project's own labels (`echolabel train-encoder`)."""

from workers.training.samples import Sample, TrainingRefused, check_trainable, class_counts
from workers.training.trainer import TrainingProgress, TrainOptions, train_encoder

__all__ = [
    "Sample",
    "TrainOptions",
    "TrainingProgress",
    "TrainingRefused",
    "check_trainable",
    "class_counts",
    "train_encoder",
]
