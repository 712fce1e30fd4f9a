"""Validation-split scores of trained encoders next to their starting ImageNet encoder.

The kNN vote accuracy (leave-one-out within the validation split of each trained encoder,
read from its config.json) is what chooses training options without touching test images:

    python -m bench.trained_validation \\
        --encoders-dir ${ECHOLABEL_ARTEFACTS_DIR:-$MODEL_DIR}/encoders \\
        --images ../shared/data/busi --labels ../shared/data/busi/labels.csv --field finding \\
        busi-v1 busi-v2
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from PIL import Image

from echolabel.encoders import load_encoder
from echolabel.encoders.trained_files import read_config
from workers.training.validation import knn_vote_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", help="trained encoder directories (busi-v1)")
    parser.add_argument("--encoders-dir", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--field", required=True)
    args = parser.parse_args()
    with open(args.labels, newline="") as handle:
        labels = {row[args.image_column]: row[args.field] for row in csv.DictReader(handle)}
    for name in args.names:
        config = read_config(args.encoders_dir / name)
        ids = [i["id"] for i in config["training"]["images"] if i["role"] == "validation"]
        classes = config["fields"][args.field]
        y = torch.tensor([[classes.index(labels[i])] for i in ids])
        images = [Image.open(args.images / i) for i in ids]
        for encoder_name in (f"trained:{name}", config["backbone"]["start"]):
            encoder = load_encoder(encoder_name, encoders_dir=args.encoders_dir)
            vectors = torch.from_numpy(encoder.embed(images))
            accuracy = knn_vote_accuracy(vectors, y)[0]
            print(f"{name}\t{encoder_name}\tvalidation images {len(ids)}\tkNN vote {accuracy}")


if __name__ == "__main__":
    main()
