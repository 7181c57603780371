"""A new project's first hour, timed with real processes: gunicorn backend, RQ worker, Redis.

Run: ``.venv/bin/python bench/first_model.py [--tasks 100] [--image-size 224]``.

A project whose classes no model has ("face", "not face": scikit-image's ``lfw_subset``, half
faces and half not, upsampled to the image size) is connected with no shared model. Then, as
Label Studio would send them:

1. one class annotation per task, then ``START_TRAINING``: the time until ``/predict`` for the
   project is answered by its first version ``p1-v1``;
2. an edited attention brush on every task, then ``START_TRAINING``: the time until the
   fine-tuned ``p1-v2`` answers, or, when the gate refuses the round, until its verdict is
   written (printed with the gate's reasons).

Each is printed with the goal (5 minutes) and with the share of it the machine learning itself
took (the job's own training time, measured in the same run), so the overhead of fetching,
queueing, publishing and swapping shows. Defaults are the product's (``ABN_FIRST_EPOCHS``,
``ABN_FIRST_TIME_BUDGET``, ``ABN_FINETUNE_EPOCHS``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
from harness import deployment, image_server
from PIL import Image
from skimage import data as skdata

from backend.brush import encode_rle
from backend.label_config import label_config_for

CLASSES = ["face", "not face"]
CONFIG = label_config_for([*CLASSES, "Other"])
GOAL_S = 300.0


def lfw_pictures(tasks: int, side: int) -> dict[str, tuple[bytes, str]]:
    """`tasks` PNGs (path -> (bytes, class)): faces and non-faces alternating."""
    faces = skdata.lfw_subset()  # 100 faces, then 100 non-faces, 25x25 grey in [0, 1]
    pictures = {}
    for i in range(tasks):
        kind = i % 2
        pixels = (faces[kind * 100 + (i // 2) % 100] * 255).astype(np.uint8)
        image = Image.fromarray(pixels).convert("RGB").resize((side, side), Image.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, "PNG")
        pictures[f"/data/upload/1/{i}.png"] = (buf.getvalue(), CLASSES[kind])
    return pictures


def annotation(aid: int, path: str, label: str, side: int, brush: bool) -> dict[str, Any]:
    results: list[dict[str, Any]] = [
        {"from_name": "class", "to_name": "image", "type": "choices", "value": {"choices": [label]}}
    ]
    if brush:  # the centre, where a face is
        alpha = np.zeros((side, side), dtype=np.uint8)
        alpha[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 255
        results.append(
            {
                "id": "att",
                "from_name": "attention",
                "to_name": "image",
                "type": "brushlabels",
                "origin": "prediction-changed",
                "original_width": side,
                "original_height": side,
                "value": {"format": "rle", "rle": encode_rle(alpha), "brushlabels": ["Attention"]},
            }
        )
    return {
        "action": "ANNOTATION_UPDATED" if brush else "ANNOTATION_CREATED",
        "annotation": {"id": aid, "result": results, "updated_at": f"2026-12-02T1{int(brush)}:00Z"},
        "task": {"id": aid, "data": {"image": path}},
        "project": {"id": 1, "label_config": CONFIG},
    }


def wait_for_version(session: requests.Session, base: str, version: str, limit: float) -> float:
    """Seconds until /predict for project 1 is answered by `version`."""
    started = time.monotonic()
    body = {
        "tasks": [{"id": 0, "data": {"image": "/data/upload/1/0.png"}}],
        "project": "1.1700000000",
        "label_config": CONFIG,
    }
    while time.monotonic() - started < limit:
        reply = session.post(base + "/predict", json=body, timeout=60).json()
        if reply["model_version"] == version and reply["results"][0]["result"]:
            return time.monotonic() - started
        time.sleep(0.5)
    raise SystemExit(f"{version} did not answer within {limit:.0f} s")


def wait_for_round(
    session: requests.Session, base: str, record: Path, since: float, limit: float
) -> tuple[float, dict[str, Any]]:
    """Seconds until the round started after `since` (wall clock) has an outcome: its version
    answering when the gate published it, or its job record when it was refused or failed."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        outcome = json.loads(record.read_text()) if record.exists() else {}
        if float(outcome.get("started_at") or 0) >= since:
            if outcome.get("status") == "published":
                waited = time.monotonic() - started
                left = limit - waited
                return waited + wait_for_version(session, base, outcome["version"], left), outcome
            if outcome.get("status") in ("rejected", "failed", "skipped"):
                return time.monotonic() - started, outcome
        time.sleep(0.5)
    raise SystemExit(f"the round had no outcome within {limit:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--pretrained", help="ABN_PRETRAINED: a local torchvision state dict")
    args = parser.parse_args()
    pictures = lfw_pictures(args.tasks, args.image_size)

    files = {path: png for path, (png, _) in pictures.items()}
    images, images_url = image_server(files)
    env = {"ABN_TRAIN_AFTER": "100000", "ABN_FIRST_IMAGE_SIZE": str(args.image_size)}
    if args.pretrained:
        env["ABN_PRETRAINED"] = args.pretrained
    session = requests.Session()
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            deployment(Path(tmp) / "model_dir", images_url, Path(tmp) / "logs", **env) as base,
        ):
            model_dir = Path(tmp) / "model_dir"
            setup = session.post(
                base + "/setup", json={"project": "1.1700000000", "schema": CONFIG}, timeout=30
            ).json()
            assert setup["model_version"] == "p1-untrained", setup
            for aid, (path, (_, label)) in enumerate(pictures.items()):
                event = annotation(aid, path, label, args.image_size, brush=False)
                session.post(base + "/webhook", json=event, timeout=30).raise_for_status()
            start = {"action": "START_TRAINING", "project": {"id": 1}}
            session.post(base + "/webhook", json=start, timeout=30).raise_for_status()
            first_s = wait_for_version(session, base, "p1-v1", 1800)
            first = json.loads((model_dir / "jobs" / "1.json").read_text())

            for aid, (path, (_, label)) in enumerate(pictures.items()):
                event = annotation(aid, path, label, args.image_size, brush=True)
                session.post(base + "/webhook", json=event, timeout=30).raise_for_status()
            since = time.time()
            session.post(base + "/webhook", json=start, timeout=30).raise_for_status()
            round_s, tuned = wait_for_round(
                session, base, model_dir / "jobs" / "1.json", since, 1800
            )
    finally:
        images.shutdown()
        images.server_close()

    report = first["first_model"]
    print(f"\nA new project, {args.tasks} tasks at {args.image_size} px, {os.cpu_count()} CPUs")
    print(
        f"START_TRAINING -> first version answering  {first_s:7.1f} s  "
        f"({first_s / GOAL_S:.2f} of the 5-minute goal; training itself {report['seconds']:.1f} s, "
        f"x{first_s / report['seconds']:.2f} end to end)"
    )
    print(
        f"  {report['epochs_run']} epochs (stopped by {report['stopped_by']}), best epoch "
        f"{report['best_epoch']}, validation accuracy "
        + (
            f"{report['validation_accuracy']:.3f} on {report['validated_on']} held-out tasks"
            if report["validation_accuracy"] is not None
            else "- (too few tasks to hold any out)"
        )
    )
    if tuned["status"] != "published":  # the served version stays; say why, with the numbers
        print(
            f"{args.tasks} corrections -> round {tuned['status']} after {round_s:7.1f} s  "
            f"({round_s / GOAL_S:.2f} of the goal): {'; '.join(tuned.get('reasons') or ())}"
        )
        return
    print(
        f"{args.tasks} corrections -> fine-tuned version answering  {round_s:7.1f} s  "
        f"({round_s / GOAL_S:.2f} of the goal; gate: {tuned['status']})"
    )


if __name__ == "__main__":
    main()
