"""Image decode and resize cost, apart from the encoder: which decode path to use.

Needs only Pillow and NumPy, so the same measurement runs under another Pillow build (e.g.
Pillow-SIMD in a scratch virtualenv): `python -m bench.decode --images DIR`.

Paths timed per image, from bytes already in memory (file reads excluded):
- PNG decode (the BUSI files as they are);
- JPEG decode of the same images re-encoded at quality 90 (uploads are often JPEG);
- JPEG *draft* decode: libjpeg scales by 1/2, 1/4 or 1/8 inside the DCT, so a large frame is
  decoded at no less than the encoder's input size instead of in full;
- the encoders' resize (shorter side → 256, bicubic) and centre crop to 224, on the decoded image.
Each at the images' native size and upscaled 4× (full-resolution ultrasound frames are larger
than BUSI's 256×256 copies; that is where draft decoding can pay).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, features

from .data import image_paths
from .timing import ratio, summarize

INPUT_SIDE = 224
RESIZE_SIDE = 256  # timm's eval transform: resize by crop_pct (0.875), then crop to 224


def pillow_build() -> dict[str, Any]:
    """Which Pillow does the decoding (Pillow-SIMD releases carry a `.postN` version)."""
    version = Image.__version__
    return {
        "pillow": version,
        "pillow_simd": ".post" in version,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "jpeg": features.version_codec("jpg"),
        "zlib": features.version_codec("zlib"),
    }


def measure(images_dir: Path, count: int) -> list[dict[str, Any]]:
    """Per-image decode/resize times (p50, p95) on `count` images, at 1× and 4× size."""
    paths = image_paths(images_dir, count)
    if not paths:
        raise FileNotFoundError(f"expected images under {images_dir}, found none")
    rows: list[dict[str, Any]] = []
    for scale in (1, 4):
        pngs, jpegs, size = _encoded(paths, scale)
        decoded = [_decode(data) for data in pngs]
        timings = {
            "PNG decode": _per_image(pngs, _decode),
            "JPEG decode": _per_image(jpegs, _decode),
            "JPEG draft decode": _per_image(jpegs, _draft_decode),
            "resize + crop": _per_image(decoded, _resize_crop),
            "JPEG decode + resize + crop": _per_image(jpegs, lambda d: _resize_crop(_decode(d))),
            "JPEG draft decode + resize + crop": _per_image(
                jpegs, lambda d: _resize_crop(_draft_decode(d))
            ),
        }
        baseline = timings["JPEG decode + resize + crop"].median
        for path, summary in timings.items():
            rows.append(
                {
                    "size": f"{size[0]}×{size[1]}",
                    "path": path,
                    "images": summary.n,
                    **summary.ms("per_image"),
                    "images_per_s": 1 / summary.median,
                    "vs_full_decode_x": ratio(summary.median, baseline),
                }
            )
    return rows


def encoded_jpegs(paths: Sequence[Path], scale: int) -> tuple[list[bytes], tuple[int, int]]:
    """The images as quality-90 JPEGs, upscaled `scale`×, and their size."""
    _, jpegs, size = _encoded(paths, scale)
    return jpegs, size


def _encoded(paths: Sequence[Path], scale: int) -> tuple[list[bytes], list[bytes], tuple]:
    pngs, jpegs = [], []
    size: tuple[int, int] = (0, 0)
    for path in paths:
        with Image.open(path) as source:
            image = source.convert("RGB")
        if scale != 1:
            image = image.resize((image.width * scale, image.height * scale), Image.BICUBIC)
        size = image.size
        for target, fmt, options in ((pngs, "PNG", {}), (jpegs, "JPEG", {"quality": 90})):
            buffer = io.BytesIO()
            image.save(buffer, format=fmt, **options)
            target.append(buffer.getvalue())
    return pngs, jpegs, size


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def _draft_decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    # draft() picks the largest DCT scale that still gives at least the requested size.
    image.draft("RGB", (INPUT_SIDE, INPUT_SIDE))
    image.load()
    return image.convert("RGB")


def _resize_crop(image: Image.Image) -> Image.Image:
    scale = RESIZE_SIDE / min(image.size)
    resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left = (resized.width - INPUT_SIDE) // 2
    top = (resized.height - INPUT_SIDE) // 2
    return resized.crop((left, top, left + INPUT_SIDE, top + INPUT_SIDE))


def _per_image(items: Sequence[Any], fn: Callable[[Any], object]) -> Any:
    fn(items[0])  # warm-up: codec set-up
    samples = []
    for item in items:
        begin = time.perf_counter()
        fn(item)
        samples.append(time.perf_counter() - begin)
    return summarize(samples)


def main(argv: Sequence[str] | None = None) -> int:
    from .profiles import BUSI_DIR

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=Path, default=BUSI_DIR)
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args(argv)
    rows = measure(args.images, args.count)
    print(json.dumps({"build": pillow_build(), "rows": rows}, indent=2))
    for row in rows:
        print(
            f"{row['size']:>10} {row['path']:<36} p50 {row['per_image_p50_ms']:7.3f} ms  "
            f"{row['vs_full_decode_x']:.2f}× full decode",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
