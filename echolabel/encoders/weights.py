"""Download encoder weights, on a machine with internet, into the layout the loaders read.

timm encoders: `<weights_dir>/<name>.safetensors` (the full timm state dict).
dreamsim: `<weights_dir>/dreamsim/` (dreamsim's own cache layout).
packaged encoders (efficientnet_lite0/1/2): nothing to download, their weights ship with a pip
package; "downloading" returns the packaged file.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import timm
from safetensors.torch import save_file

from echolabel.encoders.base import EncoderError, available_encoders
from echolabel.encoders.dreamsim_encoder import (
    build_dreamsim,
    dreamsim_cache_dir,
    dreamsim_files,
    missing_dreamsim_files,
)
from echolabel.encoders.timm_encoders import TIMM_MODELS, hf_hub_id, packaged_weights_path


def _packaged(name: str, weights_dir: Path) -> list[Path]:
    return [packaged_weights_path(name)]


def _download_timm(name: str, weights_dir: Path) -> list[Path]:
    model_id = TIMM_MODELS[name].model_id
    try:
        # The upstream weights as published, at their native input size; the loader adapts them.
        model = timm.create_model(model_id, pretrained=True)
    except Exception as exc:  # hub, HTTP and file errors come in many types
        raise EncoderError(
            f"downloading {model_id} weights from the Hugging Face hub ({hf_hub_id(name)}) "
            f"failed: {exc}\nThis needs internet access to huggingface.co."
        ) from exc
    weights_dir.mkdir(parents=True, exist_ok=True)
    target = weights_dir / f"{name}.safetensors"
    partial_file = target.with_name(target.name + ".part")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(partial_file))
    # A reader never sees a half-written file under the final name.
    partial_file.replace(target)
    return [target]


def _download_dreamsim(weights_dir: Path) -> list[Path]:
    cache_dir = dreamsim_cache_dir(weights_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        build_dreamsim(cache_dir, device="cpu")
    except Exception as exc:  # urllib, zipfile, torch hub and peft errors come in many types
        raise EncoderError(
            f"downloading DreamSim weights into {cache_dir} failed: {exc}\n"
            "This needs internet access to github.com and dl.fbaipublicfiles.com."
        ) from exc
    missing = missing_dreamsim_files(cache_dir)
    if missing:
        raise EncoderError(
            "DreamSim loaded but these files are still missing: "
            + ", ".join(str(path) for path in missing)
        )
    # The release zip is extracted by now and dreamsim never reads it again.
    (cache_dir / "pretrained.zip").unlink(missing_ok=True)
    return dreamsim_files(cache_dir)


# Derived from the one table of timm encoders, plus DreamSim (not a timm model).
_DOWNLOADERS: dict[str, Callable[[Path], list[Path]]] = {
    **{
        name: partial(_packaged if spec.packaged else _download_timm, name)
        for name, spec in TIMM_MODELS.items()
    },
    "dreamsim": _download_dreamsim,
}


def download_weights(name: str, weights_dir: Path) -> list[Path]:
    """Download the weights of encoder `name` into `weights_dir`; return the files written.

    Raises EncoderError for an unknown name or when the download fails (e.g. no internet).
    """
    if name not in _DOWNLOADERS:
        known = ", ".join(available_encoders())
        raise EncoderError(f"unknown encoder {name!r}; known encoders: {known}")
    return _DOWNLOADERS[name](Path(weights_dir))
