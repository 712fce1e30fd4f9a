"""Section 3: embedding throughput per encoder against a roofline, and decode/resize cost.

The roofline is compute-only: forward FLOPs per image (torch's FlopCounterMode) divided by the
peak FLOP/s of a large matmul measured on the same device in the same run. Three paths per
batch size: `embed()` end to end (preprocessing included, as the backend runs it), the model's
forward alone on preprocessed tensors, and that forward in channels-last memory format (a
candidate: oneDNN's depthwise convolutions prefer it on CPU). Minor page faults per image show
how much of a forward goes to the allocator handing out fresh pages.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from echolabel.encoders import (
    Encoder,
    EncoderError,
    WeightsMissingError,
    available_encoders,
    load_encoder,
)
from echolabel.encoders.base import resolve_device
from echolabel.images import decode_image

from . import decode
from .data import image_paths
from .profiles import EmbeddingProfile, Profile
from .report import SectionResult, Table
from .timing import ratio, summarize

GOAL_ROOFLINE_SHARE = 0.5  # "within 2× of the roofline"

COLUMNS = [
    ("encoder", "encoder"),
    ("device", "device"),
    ("path", "path"),
    ("batch", "batch"),
    ("ms_per_image", "ms/image (median)"),
    ("images_per_s", "images/s"),
    ("vs_batch1_x", "ms/image × batch 1"),
    ("gflop_per_image", "GFLOP/image"),
    ("roofline_images_per_s", "roofline images/s"),
    ("roofline_share", "share of roofline"),
    ("minor_faults_per_image", "page faults/image"),
]


def run(profile: Profile, log: Callable[[str], None]) -> SectionResult:
    settings = profile.embedding
    result = SectionResult("embedding")
    device = resolve_device("auto")
    peak = peak_flops(device, settings.matmul_size)
    log(f"embedding: peak {peak / 1e9:.1f} GFLOP/s on {device} ({_device_name(device)})")
    table = result.table(
        f"Embedding throughput on {device} ({_device_name(device)}), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; roofline = forward FLOPs ÷ "
        f"{peak / 1e9:.1f} GFLOP/s (fp32 matmul {settings.matmul_size}² on this device)",
        COLUMNS,
    )
    images = _images(profile, settings)
    findings: dict[str, Any] = {
        "device": device,
        "device_name": _device_name(device),
        "torch_threads": torch.get_num_threads(),
        "peak_gflop_s": peak / 1e9,
        "encoders": {},
    }
    for name in settings.encoders or tuple(available_encoders()):
        try:
            encoder = load_encoder(name, device=device, batch_size=max(settings.batch_sizes))
        except WeightsMissingError:
            table.skip(name, "weights missing (see `echolabel weights download`)")
            continue
        except EncoderError as exc:
            table.skip(name, f"could not load: {str(exc).splitlines()[0]}")
            continue
        log(f"embedding: {name}")
        findings["encoders"][name] = _bench_encoder(encoder, images, settings, peak, table)
    decode_table(result, profile, images, findings)
    result.findings = findings
    return result


def _images(profile: Profile, settings: EmbeddingProfile) -> list[Image.Image]:
    paths = image_paths(profile.images_dir, max(settings.images, max(settings.batch_sizes)))
    if not paths:
        raise FileNotFoundError(
            f"the embedding bench needs images: none under {profile.images_dir}"
        )
    loaded = [decode_image(p.read_bytes(), max_pixels=50_000_000) for p in paths]
    while len(loaded) < max(settings.images, max(settings.batch_sizes)):
        loaded += loaded
    return loaded


def _bench_encoder(
    encoder: Encoder,
    images: list[Image.Image],
    settings: EmbeddingProfile,
    peak: float,
    table: Table,
) -> dict[str, Any]:
    flops = forward_flops(encoder, images[0])
    bound = peak / flops if flops else None
    model = getattr(encoder, "model", None)
    transform = getattr(encoder, "transform", None)
    paths: dict[str, Callable[[int], Callable[[], object]]] = {
        "embed() end to end": lambda b: _embed_round(encoder, images, b, settings.images),
    }
    if isinstance(model, torch.nn.Module) and callable(transform):
        tensors = torch.stack([transform(image) for image in images[: max(settings.batch_sizes)]])
        paths["forward"] = lambda b: _forward(model, tensors[:b], encoder.device, False)
        paths["forward, channels-last"] = lambda b: _forward(
            model, tensors[:b], encoder.device, True
        )
    rows = []
    for path, make in paths.items():
        for batch in settings.batch_sizes:
            per_round = batch if path != "embed() end to end" else max(batch, settings.images)
            per_image, faults = _time_per_image(make(batch), per_round, settings.repeats)
            share = ratio(1 / per_image, bound)
            rows.append(
                {
                    "encoder": encoder.name,
                    "device": encoder.device,
                    "path": path,
                    "batch": batch,
                    "ms_per_image": 1000 * per_image,
                    "images_per_s": 1 / per_image,
                    "gflop_per_image": flops / 1e9 if flops else None,
                    "roofline_images_per_s": bound,
                    "roofline_share": share,
                    "minor_faults_per_image": faults,
                }
            )
    for row in rows:
        first = next(r for r in rows if r["path"] == row["path"])
        row["vs_batch1_x"] = ratio(row["ms_per_image"], first["ms_per_image"])
        table.add(row)
    best = max((r for r in rows if r["roofline_share"] is not None), default=None, key=_share)
    if model is not None:
        model.to(memory_format=torch.contiguous_format)  # leave the encoder as loaded
    return {
        "dim": encoder.dim,
        "forward_gflop_per_image": flops / 1e9 if flops else None,
        "roofline_images_per_s": bound,
        "best_roofline_share": best["roofline_share"] if best else None,
        "best_path": f"{best['path']}, batch {best['batch']}" if best else None,
        "meets_goal": bool(best and best["roofline_share"] >= GOAL_ROOFLINE_SHARE),
    }


def _share(row: dict[str, Any]) -> float:
    return float(row["roofline_share"])


def _embed_round(
    encoder: Encoder, images: Sequence[Image.Image], batch: int, count: int
) -> Callable[[], object]:
    """`count` images (at least one batch) through embed(), `batch` per call."""
    count = max(batch, count - count % batch)
    chunks = [images[i : i + batch] for i in range(0, count, batch)]

    def round_() -> None:
        for chunk in chunks:
            encoder.embed(chunk)

    return round_


def _forward(
    model: torch.nn.Module, batch: torch.Tensor, device: str, channels_last: bool
) -> Callable[[], object]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # Set when the path is made, i.e. just before it is timed (the paths share one model).
    model.to(memory_format=fmt)
    inputs = batch.to(device).contiguous(memory_format=fmt)

    def forward() -> None:
        with torch.inference_mode():
            model(inputs)
        if device == "cuda":
            torch.cuda.synchronize()

    return forward


def _time_per_image(fn: Callable[[], object], images: int, repeats: int) -> tuple[float, float]:
    """Median seconds per image over `repeats` rounds (after one warm-up), faults per image."""
    fn()
    samples = []
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(max(1, repeats)):
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) / images)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    return summarize(samples).median, faults / (images * max(1, repeats))


def forward_flops(encoder: Encoder, image: Image.Image) -> float:
    """FLOPs (2 per multiply-add) torch counts for embedding one image; 0 if it uses none."""
    counter = FlopCounterMode(display=False)
    with counter:
        encoder.embed([image])
    return float(counter.get_total_flops())


def peak_flops(device: str, size: int, repeats: int = 5) -> float:
    """Best FLOP/s of a square fp32 matmul (fp16 on CUDA, as the encoders run there)."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def matmul() -> None:
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()

    matmul()
    best = min(_seconds(matmul) for _ in range(repeats))
    return 2 * size**3 / best


def _seconds(fn: Callable[[], object]) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    from .report import machine

    return str(machine()["cpu"])


def decode_table(
    result: SectionResult,
    profile: Profile,
    images: list[Image.Image],
    findings: dict[str, Any],
) -> None:
    """Decode and resize per image (bench.decode), plus the default encoder's full transform."""
    settings = profile.embedding
    build = decode.pillow_build()
    table = result.table(
        f"Decode and resize per image, {settings.decode_images} BUSI images "
        f"(Pillow {build['pillow']}{' SIMD' if build['pillow_simd'] else ''}, libjpeg-turbo "
        f"{build['libjpeg_turbo']}); ratios against a full JPEG decode + resize + crop",
        [
            ("size", "image size"),
            ("path", "path"),
            ("per_image_p50_ms", "p50 ms"),
            ("per_image_p95_ms", "p95 ms"),
            ("images_per_s", "images/s"),
            ("vs_full_decode_x", "× full decode"),
        ],
    )
    for row in decode.measure(profile.images_dir, settings.decode_images):
        table.add(row)
    findings["pillow"] = build
    try:
        encoder = load_encoder("efficientnet_lite0")
    except EncoderError as exc:
        table.skip("encoder transform", f"{exc}".splitlines()[0])
        return
    shipped_decode(table, profile, encoder, findings)
    transform = getattr(encoder, "transform", None)
    if callable(transform):
        samples = []
        for image in images[: settings.decode_images]:
            begin = time.perf_counter()
            transform(image)
            samples.append(time.perf_counter() - begin)
        summary = summarize(samples)
        table.add(
            {
                "size": f"{images[0].width}×{images[0].height}",
                "path": "efficientnet_lite0 transform (resize, crop, to tensor, normalise)",
                **summary.ms("per_image"),
                "images_per_s": 1 / summary.median,
            }
        )


def shipped_decode(table: Table, profile: Profile, encoder: Encoder, findings: dict) -> None:
    """The decode the backend ships (`decode_image` with the encoder's resize side) on 4×
    BUSI JPEGs, against a full decode through the same function, and what draft decoding does
    to the vectors: cosine between the embeddings of both decodes of each image."""
    count = profile.embedding.decode_images
    side = getattr(encoder, "input_side", None)
    jpegs, size = decode.encoded_jpegs(image_paths(profile.images_dir, count), scale=4)
    paths = {
        "decode_image (full decode)": lambda data: decode_image(data, max_pixels=10**9),
        f"decode_image, min_side={side} (shipped)": lambda data: decode_image(
            data, max_pixels=10**9, min_side=side
        ),
    }
    timings = {name: _per_image_timing(jpegs, fn) for name, fn in paths.items()}
    baseline = timings["decode_image (full decode)"].median
    for name, summary in timings.items():
        table.add(
            {
                "size": f"{size[0]}×{size[1]}",
                "path": name,
                **summary.ms("per_image"),
                "images_per_s": 1 / summary.median,
                "vs_full_decode_x": ratio(summary.median, baseline),
            }
        )
    full, drafted = ([fn(data) for data in jpegs] for fn in paths.values())
    cosines = (encoder.embed(full) * encoder.embed(drafted)).sum(axis=1)
    agreement = {
        "images": len(jpegs),
        "median": float(np.median(cosines)),
        "min": float(cosines.min()),
    }
    findings["draft_decode_cosine"] = agreement
    table.notes.append(
        f"vectors of draft-decoded vs fully decoded {size[0]}×{size[1]} JPEGs ({encoder.name}, "
        f"{len(jpegs)} images): cosine median {agreement['median']:.4f}, min {agreement['min']:.4f}"
    )


def _per_image_timing(items: Sequence[bytes], fn: Callable[[bytes], object]) -> Any:
    fn(items[0])
    samples = [_seconds(lambda item=item: fn(item)) for item in items]
    return summarize(samples)
