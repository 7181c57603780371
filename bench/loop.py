"""The loop's latencies, with real processes: gunicorn backend, RQ worker, embedded Redis.

Run: ``.venv/bin/python bench/loop.py [--image-size 224] [--corrections 8] [--epochs 3]``.
Prints, in one run:

- webhook acknowledgement latency (p50, p99) while a fine-tuning job runs, against idle;
- time from a version's publication to the first /predict answered by it;
- /predict latency during a swap against before it.

Images are served by a local HTTP server standing in for Label Studio's upload endpoint.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch
from harness import deployment, image_server
from PIL import Image

from backend.brush import encode_rle
from backend.label_config import label_config_for
from backend.registry import ModelRegistry
from model import build_abn, load_checkpoint
from model.checkpoint import make_meta

CLASSES = [str(i) for i in range(10)]
CONFIG = label_config_for(CLASSES)
SIDE = 256


def pictures() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    files = {}
    for i in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)).save(buf, "PNG")
        files[f"/data/upload/1/{i}.png"] = buf.getvalue()
    return files


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) * 1000


def event(aid: int, task: int) -> dict:
    alpha = np.zeros((SIDE, SIDE), dtype=np.uint8)
    alpha[:, : SIDE // 2] = 255
    brush = {
        "id": "a",
        "from_name": "attention",
        "to_name": "image",
        "type": "brushlabels",
        "origin": "prediction-changed",
        "original_width": SIDE,
        "original_height": SIDE,
        "value": {"format": "rle", "rle": encode_rle(alpha), "brushlabels": ["Attention"]},
    }
    choice = {
        "from_name": "class",
        "to_name": "image",
        "type": "choices",
        "value": {"choices": [CLASSES[task % 10]]},
    }
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": aid, "task": task, "result": [brush, choice]},
        "task": {"id": task, "data": {"image": f"/data/upload/1/{task % 64}.png"}},
        "project": {"id": 1, "label_config": CONFIG},
    }


def timed_post(session: requests.Session, url: str, body: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    reply = session.post(url, json=body, timeout=60)
    reply.raise_for_status()
    return time.perf_counter() - started, reply.json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--corrections", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    images, images_url = image_server(pictures())
    env = {
        "ABN_TRAIN_AFTER": "100000",
        "ABN_FINETUNE_EPOCHS": str(args.epochs),
        "ABN_GATE_ACCURACY_MARGIN": "1",
        "ABN_GATE_MAP_MARGIN": "1",
    }
    session = requests.Session()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model_dir"
        torch.manual_seed(0)
        meta = make_meta("abn", "resnet18", CLASSES, args.image_size)
        registry = ModelRegistry(model_dir)
        registry.publish(build_abn("resnet18", len(CLASSES)), meta, reason="bench")
        try:
            with deployment(model_dir, images_url, Path(tmp) / "logs", **env) as base:
                predict = {
                    "tasks": [{"id": 0, "data": {"image": "/data/upload/1/0.png"}}],
                    "label_config": CONFIG,
                    "project": "1.1700000000",
                }
                for _ in range(3):
                    timed_post(session, base + "/predict", predict)  # warm both workers

                idle = [
                    timed_post(session, base + "/webhook", event(i, i))[0]
                    for i in range(args.corrections)
                ]
                timed_post(
                    session, base + "/webhook", {"action": "START_TRAINING", "project": {"id": 1}}
                )
                busy = []
                aid = 10_000
                own = ModelRegistry(model_dir, "1")  # the round forks v1 into project 1's lineage
                while own.current() is None:
                    busy.append(timed_post(session, base + "/webhook", event(aid, aid % 64))[0])
                    aid += 1
                    time.sleep(0.05)
                published_at = own.current()["published_at"]
                while True:
                    _, reply = timed_post(session, base + "/predict", predict)
                    if reply["model_version"] == "p1-v2":
                        first_new = time.time() - published_at
                        break

                before = [timed_post(session, base + "/predict", predict)[0] for _ in range(20)]
                model, meta2 = load_checkpoint(own.current_checkpoint())
                during: list[float] = []
                own.publish(model, meta2, reason="swap bench")
                swap_end = time.monotonic() + 2.0
                while time.monotonic() < swap_end:
                    during.append(timed_post(session, base + "/predict", predict)[0])
        finally:
            images.shutdown()
            images.server_close()

    print(f"\nloop latencies, ABN-ResNet18 at {args.image_size}px, 2 gunicorn workers, CPU")
    print(
        f"webhook ack idle        p50 {percentile(idle, 50):7.1f} ms  "
        f"p99 {percentile(idle, 99):7.1f} ms  (n={len(idle)})"
    )
    print(
        f"webhook ack during job  p50 {percentile(busy, 50):7.1f} ms  "
        f"p99 {percentile(busy, 99):7.1f} ms  (n={len(busy)}, "
        f"x{statistics.median(busy) / statistics.median(idle):.2f} of idle p50)"
    )
    print(f"publication -> first response from the new version: {first_new:.2f} s")
    print(
        f"/predict before a swap  p50 {percentile(before, 50):7.1f} ms  "
        f"p95 {percentile(before, 95):7.1f} ms"
    )
    print(
        f"/predict during a swap  p50 {percentile(during, 50):7.1f} ms  "
        f"p95 {percentile(during, 95):7.1f} ms  "
        f"(x{statistics.median(during) / statistics.median(before):.2f})"
    )


if __name__ == "__main__":
    main()
