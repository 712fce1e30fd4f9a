"""Does cropping ultrasound images to their sector help the vote? `ECHOLABEL_ULTRASOUND_CROP`.

BUSI's images are already cropped to the scan, so the crop is measured twice: on BUSI as it is,
and on BUSI *framed* like a scanner's screen capture (each image shrunk and placed at a varying
spot on a black 640×480 screen, with burned-in text lines, a grey bar and a distance scale, as
in the ultrasound files pydicom ships). Framing is seeded by the image name, never by its
label. Each set is evaluated with the crop off and on (`evaluate_folder`, leave-one-out,
the default encoder), and the table prints vote accuracy and same-label counts side by side:

    python -m bench.sector_crop --busi ../shared/data/busi --work /tmp/busi-framed

The framed copies are written under --work (outside the repository) and reused on a rerun.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from echolabel.folders import read_folder
from echolabel.settings import Settings
from workers.evaluation.runner import evaluate_folder

SCREEN = (640, 480)
_WORDS = ("GEN", "RAD", "MED", "CTR", "L12-5", "BREAST", "ABD", "MI 0.8", "TIS 0.4", "Gn 60")


def frame(image: Image.Image, name: str) -> Image.Image:
    """`image` as a screen capture: shrunk onto a black screen with text, bar and scale."""
    rng = np.random.default_rng(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    screen = Image.new("RGB", SCREEN)
    side = int(rng.integers(260, 380))
    scan = image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    left = int(rng.integers(110, SCREEN[0] - side - 60))
    top = int(rng.integers(70, SCREEN[1] - side - 20))
    screen.paste(scan, (left, top))
    draw = ImageDraw.Draw(screen)
    for line in range(4):  # burned-in site, patient, date lines (random, label-free)
        words = " ".join(rng.choice(_WORDS, size=3))
        draw.text(
            (8, 6 + 14 * line), f"{words} {int(rng.integers(1000, 99999))}", fill=(230, 230, 230)
        )
        draw.text((SCREEN[0] - 130, 6 + 14 * line), words, fill=(200, 200, 200))
    for y in range(top, top + side // 2):  # grey bar beside the scan
        shade = int(255 * (y - top) / (side // 2))
        draw.line([(SCREEN[0] - 30, y), (SCREEN[0] - 20, y)], fill=(shade, shade, shade))
    scale_y = SCREEN[1] - 12
    draw.line([(60, scale_y), (60 + side // 2, scale_y)], fill=(255, 255, 255))
    for tick in range(0, side // 2 + 1, side // 10):
        draw.line([(60 + tick, scale_y - 4), (60 + tick, scale_y)], fill=(255, 255, 255))
    return screen


def framed_copy(busi: Path, work: Path) -> Path:
    """BUSI framed under `work` (images/ and labels.csv with the same rows); reused if there."""
    labels = work / "labels.csv"
    if labels.exists():
        return labels
    with open(busi / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in tqdm(rows, desc="framing", unit="img"):
        out = work / row["image"]
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(busi / row["image"]) as image:
            frame(image, row["image"]).save(out)
    with open(labels, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return labels


def measure(root: Path, labels: Path, crop: str, settings: Settings) -> dict[str, Any]:
    items = read_folder(root, labels, fields=("finding",))
    report = evaluate_folder(
        items,
        ["finding"],
        [settings.encoder],
        dataclasses.replace(settings, ultrasound_crop=crop),
        root=root.resolve(),
        command=f"python -m bench.sector_crop (crop={crop})",
    )
    field = report["encoders"][settings.encoder]["fields"]["finding"]
    return {
        "vote_accuracy": field["vote"]["accuracy"],
        "coverage": field["vote"]["coverage"],
        "macro_f1": field["vote"]["macro_f1"],
        "same_in_top10": field["weighted_same_in_top10"],
        "random": field["weighted_random_expectation"],
        "p_at_1": field["precision_at_k"]["micro"]["1"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busi", type=Path, required=True, help="BUSI folder (labels.csv)")
    parser.add_argument("--work", type=Path, required=True, help="folder for the framed copy")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    framed_labels = framed_copy(args.busi, args.work)
    results: dict[str, dict[str, Any]] = {}
    for name, root, labels in (
        ("BUSI as distributed", args.busi, args.busi / "labels.csv"),
        ("BUSI framed as screen captures", args.work, framed_labels),
    ):
        for crop in ("off", "all"):
            results[f"{name} / crop {crop}"] = measure(root, labels, crop, settings)
            print(f"{name} / crop {crop}: {results[f'{name} / crop {crop}']}", file=sys.stderr)
    print(
        f"{'set / crop':44} {'vote acc':>8} {'coverage':>8} {'macro F1':>8} "
        f"{'same@10':>8} {'random':>7} {'P@1':>6}"
    )
    for key, r in results.items():
        print(
            f"{key:44} {r['vote_accuracy']:8.3f} {r['coverage']:8.2f} {r['macro_f1']:8.3f} "
            f"{r['same_in_top10']:8.2f} {r['random']:7.2f} {r['p_at_1']:6.3f}"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
