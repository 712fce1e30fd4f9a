"""What a training reports while it runs, into the job's meta: a module of its own because both
`train_encoder` and the epoch loop report it; it imports no torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainingProgress:
    """Progress in the job's meta: `total`/`done` count images while loading and computing
    frozen features, epochs while training."""

    stage: str
    total: int
    done: int
    epoch: int = 0
    epochs: int = 0
    loss: float | None = None
    val_accuracy: float | None = None
    eta_s: float | None = None

    def as_meta(self) -> dict[str, object]:
        return asdict(self)
