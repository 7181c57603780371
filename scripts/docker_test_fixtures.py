"""Inputs for scripts/docker_test.sh, written by the image's own Python (run from the image).

Usage: python3 docker_test_fixtures.py OUT   Writes under OUT:
  ckpt/tiny.pt                 an untrained ABN-ResNet18, 3 classes at 64 px (the shared v1)
  images/data/upload/1/N.png   six small PNGs, served as Label Studio's upload folder
  predict.json                 a /predict body for task 0
  annotation-N.json            ANNOTATION_CREATED webhooks for tasks 0..2 with a brush result
  start_training.json          a START_TRAINING webhook for project 1
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backend.brush import encode_rle
from backend.label_config import label_config_for
from model import build_abn, save_checkpoint
from model.checkpoint import make_meta

CLASSES = ["cat", "dog", "fox"]
WIDTH, HEIGHT = 48, 40


def main(out: Path) -> None:
    torch.manual_seed(0)
    save_checkpoint(
        out / "ckpt" / "tiny.pt",
        build_abn("resnet18", len(CLASSES)),
        make_meta("abn", "resnet18", CLASSES, image_size=64),
    )
    uploads = out / "images" / "data" / "upload" / "1"
    uploads.mkdir(parents=True)
    for i in range(6):
        image = Image.new("RGB", (WIDTH, HEIGHT), (20 * i, 80, 160))
        for x in range(WIDTH):
            image.putpixel((x, HEIGHT // 2), (x * 5, 200, 90))
        image.save(uploads / f"{i}.png")
    config = label_config_for(CLASSES)
    task = {"id": 0, "data": {"image": "/data/upload/1/0.png"}}
    write(
        out / "predict.json", {"tasks": [task], "label_config": config, "project": "1.1700000000"}
    )
    alpha = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    alpha[:, : WIDTH // 2] = 255  # "look at the left half"
    for i in range(3):
        brush = {
            "id": "att",
            "from_name": "attention",
            "to_name": "image",
            "type": "brushlabels",
            "origin": "prediction-changed",
            "original_width": WIDTH,
            "original_height": HEIGHT,
            "value": {"format": "rle", "rle": encode_rle(alpha), "brushlabels": ["Attention"]},
        }
        choice = {
            "from_name": "class",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": [CLASSES[i % len(CLASSES)]]},
        }
        event = {
            "action": "ANNOTATION_CREATED",
            "annotation": {
                "id": 100 + i,
                "task": i,
                "result": [brush, choice],
                "updated_at": "2026-11-26T10:00:00Z",
            },
            "task": {
                "id": i,
                "data": {"image": f"/data/upload/1/{i}.png"},
                "predictions": [{"model_version": "v1"}],
            },
            "project": {"id": 1, "label_config": config},
        }
        write(out / f"annotation-{i}.json", event)
    write(out / "start_training.json", {"action": "START_TRAINING", "project": {"id": 1}})


def write(path: Path, body: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
