"""The `Encoder` interface, its errors, and the registry that turns a name into a loaded encoder.

Encoder modules register a factory under a name; `load_encoder` resolves the device and the
weights directory and calls it. Nothing is cached here: the caller keeps the encoder it loads.
"""

from __future__ import annotations

import hashlib
import importlib
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from echolabel.images import to_rgb

if TYPE_CHECKING:
    import torch

DEFAULT_ENCODER = "efficientnet_lite0"


@runtime_checkable
class Encoder(Protocol):
    """Turns images into L2-normalised float32 embeddings of a fixed size."""

    name: str
    dim: int
    # Short stable id of the weights actually loaded, so suggestions from different weights
    # of the same encoder are told apart in model_version.
    weights_id: str
    device: str

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Return an (n, dim) float32 array with unit-norm rows; (0, dim) for no images."""
        ...


class EncoderError(RuntimeError):
    """An encoder could not be found, loaded or run."""


class WeightsMissingError(EncoderError):
    """The weights an encoder needs are not on this machine; the message says how to get them."""

    def __init__(
        self, name: str, paths: Sequence[Path], weights_dir: Path, *, source: str | None = None
    ) -> None:
        self.name = name
        self.paths = list(paths)
        self.weights_dir = weights_dir
        expected = "\n".join(f"  {path}" for path in self.paths)
        origin = f"They come from {source}; loading never downloads.\n" if source else ""
        super().__init__(
            f"Weights for encoder {name!r} not found. Expected:\n{expected}\n{origin}"
            f"On a machine with internet access run\n"
            f"  echolabel weights download {name} --dir {weights_dir}\n"
            f"then copy {weights_dir} here (and point ECHOLABEL_WEIGHTS_DIR at it)."
        )


EncoderFactory = Callable[[Path, str, int], Encoder]
"""Builds an encoder from (weights_dir, device, batch_size); device is already resolved."""

EncoderFamily = Callable[[str, Path, Path, str, int], Encoder]
"""Builds the encoder `<prefix>:<member>` from (member, encoders_dir, weights_dir, device,
batch_size); weights_dir is where a member built on a pretrained encoder finds its weights."""

_FACTORIES: dict[str, EncoderFactory] = {}
_FAMILIES: dict[str, EncoderFamily] = {}

# The built-in plug-ins register themselves when imported, which imports torch and timm (~5 s
# on these cores). They are imported on the registry's first use, not with this package: a
# backend restarting on stored vectors answers before any encoder is needed.
_BUILT_IN = (
    "echolabel.encoders.timm_encoders",
    "echolabel.encoders.dreamsim_encoder",
    "echolabel.encoders.trained",
    "echolabel.encoders.centred",
)
_built_in_lock = threading.Lock()
_built_in_loaded = False


def _load_built_in() -> None:
    global _built_in_loaded
    if _built_in_loaded:
        return
    with _built_in_lock:
        if not _built_in_loaded:
            for module in _BUILT_IN:
                importlib.import_module(module)
            _built_in_loaded = True


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Decorator that registers an encoder factory under `name`."""

    def register(factory: EncoderFactory) -> EncoderFactory:
        if name in _FACTORIES:
            raise EncoderError(f"encoder {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return register


def register_encoder_family(prefix: str) -> Callable[[EncoderFamily], EncoderFamily]:
    """Decorator that registers a family of encoders named `<prefix>:<member>` (e.g. the
    encoders trained on a project, one directory each under `encoders_dir`)."""

    def register(family: EncoderFamily) -> EncoderFamily:
        if prefix in _FAMILIES:
            raise EncoderError(f"encoder family {prefix!r} is already registered")
        _FAMILIES[prefix] = family
        return family

    return register


def encoder_family(name: str) -> str | None:
    """The family prefix of `name` (`trained` for `trained:busi-v1`), or None."""
    _load_built_in()
    prefix, sep, _ = name.partition(":")
    return prefix if sep and prefix in _FAMILIES else None


def available_encoders() -> list[str]:
    """Names accepted by `load_encoder`, sorted."""
    _load_built_in()
    return sorted(_FACTORIES)


def default_weights_dir() -> Path:
    """Where weights live when the caller names no directory."""
    return Path("~/.cache/echolabel/weights").expanduser()


def resolve_device(device: str) -> str:
    """Map "cpu", "cuda" or "auto" to the torch device to use."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda":
        if not torch.cuda.is_available():
            raise EncoderError("device 'cuda' requested but torch sees no CUDA device")
        return device
    raise EncoderError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")


def load_encoder(
    name: str,
    *,
    weights_dir: Path | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    encoders_dir: Path | None = None,
) -> Encoder:
    """Load the encoder registered as `name` with its weights from `weights_dir`.

    A family member (`trained:busi-v1`) is looked up in `encoders_dir` (<artefacts>/encoders).
    Raises EncoderError for an unknown name or bad arguments, and WeightsMissingError when the
    weights are not on this machine (without trying the network).
    """
    family = encoder_family(name)  # loads the built-in plug-ins
    if name not in _FACTORIES and family is None:
        known = ", ".join(available_encoders() + [f"{prefix}:<name>" for prefix in _FAMILIES])
        raise EncoderError(f"unknown encoder {name!r}; known encoders: {known}")
    if batch_size < 1:
        raise EncoderError(f"batch_size must be at least 1, got {batch_size}")
    weights_dir = default_weights_dir() if weights_dir is None else Path(weights_dir)
    if family is not None:
        if encoders_dir is None:
            raise EncoderError(
                f"encoder {name!r} needs the encoders directory (<artefacts>/encoders)"
            )
        member = name.partition(":")[2]
        return _FAMILIES[family](
            member, Path(encoders_dir), weights_dir, resolve_device(device), batch_size
        )
    return _FACTORIES[name](weights_dir, resolve_device(device), batch_size)


def file_id(path: Path) -> str:
    """First 12 hex digits of the file's sha256: a short id for the weights it holds."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


@contextmanager
def _autocast(device: str) -> Iterator[None]:
    # Half precision on CUDA is faster and halves activation memory; autocast keeps the ops
    # that are unsafe in fp16 (norms, reductions) in fp32, so every model can run under it.
    if device == "cuda":
        import torch

        with torch.autocast(device_type="cuda", dtype=torch.float16):
            yield
    else:
        yield


def embed_in_batches(
    images: Sequence[Image.Image],
    *,
    preprocess: Callable[[Image.Image], torch.Tensor],
    forward: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    device: str,
    batch_size: int,
) -> np.ndarray:
    """Run `forward` over preprocessed RGB images, `batch_size` at a time, and L2-normalise.

    `preprocess` maps one RGB image to a (3, H, W) tensor; `forward` maps a batch to (n, dim).
    """
    import torch

    if len(images) == 0:
        return np.zeros((0, dim), dtype=np.float32)
    chunks = []
    with torch.inference_mode(), _autocast(device):
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = torch.stack([preprocess(to_rgb(image)) for image in chunk])
            features = forward(batch.to(device)).float()
            if features.shape != (batch.shape[0], dim):
                raise EncoderError(
                    f"encoder produced features of shape {tuple(features.shape)}, "
                    f"expected ({batch.shape[0]}, {dim})"
                )
            chunks.append(torch.nn.functional.normalize(features, dim=1).cpu().numpy())
    return np.concatenate(chunks).astype(np.float32, copy=False)
