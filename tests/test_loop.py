"""The whole loop with real processes: gunicorn backend, RQ worker, Redis, HTTP in between.

Label Studio's side is played by the fake host of conftest.py (it serves the images) and by
webhook payloads shaped as Label Studio 1.23.2 sends them (tests/e2e drives the real server).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import requests
from conftest import CLASSES, TOKEN, FakeLabelStudio, png_bytes
from processes import ROOT, Loop, is_dead, running_backend, wait_for

from backend.brush import encode_rle
from backend.label_config import label_config_for
from model import load_checkpoint

pytestmark = pytest.mark.slow  # real gunicorn, RQ workers and Redis, and real fine-tuning

CONFIG = label_config_for(CLASSES)
IMAGE_SIZE = (48, 40)  # width, height of the served test images
# How long a swap may take before a test calls it lost. Generous: on a busy machine loading a
# version takes seconds; how fast a swap really is is measured in bench/loop.py.
SWAP_WAIT = 60


@pytest.fixture
def loop(tmp_path: Path, tiny_checkpoint: Path, fake_ls: FakeLabelStudio) -> Iterator[Loop]:
    for i in range(12):
        fake_ls.add(f"/data/upload/1/{i}.png", png_bytes(*IMAGE_SIZE, color=(20 * i, 80, 160)))
    env = {
        "LABEL_STUDIO_URL": fake_ls.url,
        "LABEL_STUDIO_API_KEY": TOKEN,
        "ABN_TRAIN_AFTER": "3",
        "ABN_FINETUNE_EPOCHS": "2",
        "ABN_SWAP_INTERVAL": "0.2",
        "ABN_GATE_ACCURACY_MARGIN": "1",
        "ABN_GATE_MAP_MARGIN": "1",
        "ABN_GATE_MIN_EVIDENCE": "1",  # rounds of a handful: the gate's statistics are test_round's
    }
    with running_backend(tmp_path, tiny_checkpoint, **env) as deployment:
        yield deployment


def brush_result(alpha: np.ndarray, origin: str = "prediction-changed") -> dict[str, Any]:
    height, width = alpha.shape
    return {
        "id": "att",
        "from_name": "attention",
        "to_name": "image",
        "type": "brushlabels",
        "origin": origin,
        "original_width": width,
        "original_height": height,
        "value": {"format": "rle", "rle": encode_rle(alpha), "brushlabels": ["Attention"]},
    }


def annotation_event(
    aid: int,
    task: int,
    alpha: np.ndarray,
    label: str = "dog",
    action: str = "ANNOTATION_CREATED",
    updated_at: str = "2026-11-26T10:00:00Z",
) -> dict[str, Any]:
    results = [
        brush_result(alpha),
        {
            "from_name": "class",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": [label]},
        },
    ]
    return {
        "action": action,
        "annotation": {"id": aid, "task": task, "result": results, "updated_at": updated_at},
        "task": {
            "id": task,
            "data": {"image": f"/data/upload/1/{task}.png"},
            "predictions": [{"model_version": "v1"}],
        },
        "project": {"id": 1, "label_config": CONFIG},
    }


def left_half(level: int = 255) -> np.ndarray:
    width, height = IMAGE_SIZE
    alpha = np.zeros((height, width), dtype=np.uint8)
    alpha[:, : width // 2] = level
    return alpha


def predict(loop: Loop, task: int = 0) -> dict[str, Any]:
    body = {
        "tasks": [{"id": task, "data": {"image": f"/data/upload/1/{task}.png"}}],
        "label_config": CONFIG,
        "project": "1.1700000000",
    }
    reply = loop.post("/predict", body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_webhook_to_stored_target(loop: Loop) -> None:
    reply = loop.post("/webhook", annotation_event(11, 0, left_half()))
    assert reply.status_code == 200 and reply.json()["stored"] is True
    assert loop.post("/webhook", annotation_event(11, 0, left_half())).json()["stored"] is False
    [stored] = loop.store().corrections("1")
    # 64 px model -> 4x4 map; the left half painted 255 -> two columns of ones.
    np.testing.assert_allclose(stored.target, np.tile([1.0, 1.0, 0.0, 0.0], (4, 1)), atol=1e-6)
    assert (stored.label, stored.task_id, stored.model_version) == ("dog", 0, "v1")
    deleted = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 11}], "project": {"id": 1}}
    assert loop.post("/webhook", deleted).json()["removed"] == 1
    assert loop.store().corrections("1") == []


@pytest.mark.parametrize(
    "body, status",
    [
        ({"action": "ANNOTATION_CREATED", "project": {"id": 1}}, 400),
        ({"annotation": {}}, 400),
        ({"action": "ANNOTATIONS_DELETED", "annotations": "7", "project": {"id": 1}}, 400),
    ],
)
def test_malformed_webhooks_are_refused_and_store_nothing(
    loop: Loop, body: dict, status: int
) -> None:
    reply = loop.post("/webhook", body)
    assert reply.status_code == status and reply.json()["error"]
    assert loop.store().corrections("1") == []


def test_a_corrupt_brush_is_refused(loop: Loop) -> None:
    event = annotation_event(12, 1, left_half())
    event["annotation"]["result"][0]["value"]["rle"] = [1, 2, 3]
    reply = loop.post("/webhook", event)
    assert reply.status_code == 400 and "brush result 0" in reply.json()["error"]
    event = annotation_event(13, 1, left_half())
    event["annotation"]["result"][0]["original_width"] = 47
    assert loop.post("/webhook", event).status_code == 400
    assert loop.store().corrections("1") == []


def test_corrections_train_publish_and_hot_swap(loop: Loop) -> None:
    loop.start("worker", "worker")
    for aid in range(3):
        reply = loop.post("/webhook", annotation_event(100 + aid, aid, left_half()))
        assert reply.status_code == 200
    assert reply.json()["training"] == "queued"  # the third correction triggered it
    # The round forks the shared v1 into project 1's own lineage.
    wait_for(lambda: loop.registry("1").current(), 240, "p1-v2: " + loop.log("worker"))
    record = loop.registry("1").current()
    assert (record["version"], record["parent_version"]) == ("p1-v2", "v1")
    assert record["annotation_ids"] and set(record["annotation_ids"]) <= {100, 101, 102}
    wait_for(lambda: loop.everyone_serves("p1-v2", "1"), SWAP_WAIT, "every process: p1-v2")
    prediction = predict(loop)
    assert prediction["results"][0]["model_version"] == "p1-v2"
    assert loop.get("/versions")["versions"] == ["v1", "p1-v2"]
    status = loop.get("/status?project=1")
    assert status["project"]["model_version"] == "p1-v2"
    assert status["last_jobs"]["1"]["status"] == "published"
    assert loop.version() == "v1" and loop.registry().current()["version"] == "v1"
    assert loop.store().untrained_count("1") == 0  # trained and held-out ones are both used


def test_a_model_failing_the_gate_is_not_published(loop: Loop) -> None:
    loop.start("worker", "worker", ABN_GATE_MAP_MARGIN="-1")  # nothing can pass
    assert loop.post("/webhook", annotation_event(200, 0, left_half())).status_code == 200
    reply = loop.post("/webhook", {"action": "START_TRAINING", "project": {"id": 1}})
    assert reply.json()["training"] == "queued"
    last = wait_for(
        lambda: loop.get("/status")["last_jobs"].get("1"),
        240,
        "the job's result: " + loop.log("worker"),
    )
    assert last["status"] == "rejected" and "distance to human maps" in last["reasons"][0]
    assert loop.registry("1").current() is None and loop.registry().current()["version"] == "v1"
    assert loop.version("1") == "v1"


def test_rollback_over_http_and_cli(loop: Loop, tiny_checkpoint: Path) -> None:
    model, meta = load_checkpoint(tiny_checkpoint)
    loop.registry().publish(model, meta, reason="test")
    wait_for(lambda: loop.everyone_serves("v2"), SWAP_WAIT, "the swap to v2")
    assert loop.post("/rollback", {"version": "v9"}).status_code == 404
    reply = loop.post("/rollback", {"version": "v1"})
    assert reply.status_code == 200, reply.text
    wait_for(lambda: loop.everyone_serves("v1"), SWAP_WAIT, "the rollback to v1")
    cli = subprocess.run(
        [sys.executable, "-m", "backend", "rollback", "v2"],
        env=loop.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    wait_for(lambda: loop.everyone_serves("v2"), SWAP_WAIT, "the rollback to v2")


def test_hot_swap_under_load_drops_nothing(loop: Loop, tiny_checkpoint: Path) -> None:
    failures: list[str] = []
    seen: list[tuple[float, str]] = []  # (when the request was sent, the version answering)
    stop = threading.Event()

    def hammer() -> None:
        session = requests.Session()
        while not stop.is_set():
            body = {
                "tasks": [{"id": 0, "data": {"image": "/data/upload/1/0.png"}}],
                "label_config": CONFIG,
            }
            sent = time.monotonic()
            try:
                reply = session.post(loop.base + "/predict", json=body, timeout=30)
            except requests.RequestException as exc:
                failures.append(repr(exc))
                continue
            if reply.status_code != 200:
                failures.append(reply.text)
                continue
            payload = reply.json()
            [result] = payload["results"]
            if not result["result"] or result["model_version"] != payload["model_version"]:
                failures.append(str(payload)[:300])
            seen.append((sent, result["model_version"]))

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        model, meta = load_checkpoint(tiny_checkpoint)
        loop.registry().publish(model, meta, reason="swap under load")
        # Bounded, not timed: every worker must come to serve v2 while the load goes on.
        wait_for(lambda: loop.everyone_serves("v2"), SWAP_WAIT, "every worker to serve v2")
        swapped = time.monotonic()
        wait_for(
            lambda: sum(t > swapped for t, _ in seen) >= 6, SWAP_WAIT, "responses after the swap"
        )
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert {v for _, v in seen} == {"v1", "v2"}
    # A request sent once every worker serves v2 is answered by v2 (no worker swaps back).
    late = [v for t, v in seen if t > swapped]
    assert late and set(late) == {"v2"}


def test_worker_killed_mid_job_leaves_the_served_model(loop: Loop) -> None:
    loop.start("worker", "worker", ABN_FINETUNE_EPOCHS="100000")
    assert loop.post("/webhook", annotation_event(300, 0, left_half())).status_code == 200
    loop.post("/webhook", {"action": "START_TRAINING", "project": {"id": 1}})

    def fine_tuning() -> bool:
        jobs = loop.get("/status")["queue"]["jobs"]
        return any(j.get("stage") == "fine-tuning" for j in jobs)

    wait_for(fine_tuning, 240, "the job to start fine-tuning: " + loop.log("worker"))
    horses = psutil.Process(loop.procs["worker"].pid).children(recursive=True)
    assert horses  # RQ runs the job in a forked work horse
    loop.procs["worker"].kill()  # the worker alone, as the OOM killer would
    try:  # its horse dies with it (backend/jobs.py, TrainingWorker) instead of training on
        wait_for(lambda: all(is_dead(h) for h in horses), 60, "the horse to die with its worker")
    finally:
        for horse in horses:  # a horse that outlived its worker is not left training
            with contextlib.suppress(psutil.NoSuchProcess):
                horse.kill()
    loop.stop("worker", signal.SIGKILL)
    assert loop.registry("1").current() is None
    assert sorted(p.name for p in loop.registry().versions_dir.iterdir()) == ["v1.pt"]
    assert list(loop.registry("1").versions_dir.iterdir()) == []
    assert loop.version("1") == "v1"
    # A trigger sent soon after, while the dead job's heartbeat may not have expired, is
    # answered "again" (the job looks alive) or "queued"; either must lead to one judged job.
    reply = loop.post("/webhook", {"action": "START_TRAINING", "project": {"id": 1}})
    assert reply.json()["training"] in ("again", "queued")
    loop.start("worker2", "worker")
    judged(loop, "the job after the restart: " + loop.log("worker2"))


def test_redis_down_keeps_corrections_and_predictions(loop: Loop) -> None:
    loop.redis.stop_server()
    reply = loop.post("/webhook", annotation_event(400, 0, left_half()))
    assert reply.status_code == 200 and reply.json()["stored"] is True
    reply = loop.post("/webhook", {"action": "START_TRAINING", "project": {"id": 1}})
    assert reply.status_code == 200 and reply.json()["training"] == "deferred"
    assert predict(loop)["results"][0]["result"]
    assert loop.store().pending_requests() == [("1", "START_TRAINING")]
    loop.redis.start_server()
    wait_for(lambda: loop.store().pending_requests() == [], 10, "the deferred request to go")
    loop.start("worker", "worker")
    judged(loop, "the job after Redis came back: " + loop.log("worker"))


def judged(loop: Loop, what: str) -> None:
    """Wait until a job has trained project 1 and its gate has judged the round.

    Whether a round of one correction is published is the gate's business (tests/test_round.py);
    what these tests need is that the job ran, trained and was judged.
    """
    last = wait_for(lambda: loop.get("/status")["last_jobs"].get("1"), 240, what)
    assert last["status"] in ("published", "rejected"), last
    assert "gate" in last and last["annotation_ids"] + last["held_out_annotation_ids"]
    if last["status"] == "published":
        assert loop.registry("1").current()["version"] == "p1-v2"
    else:
        assert loop.registry("1").current() is None and last["reasons"]
