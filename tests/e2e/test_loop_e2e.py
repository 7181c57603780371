"""The whole product against a real Label Studio 1.23.2: predictions, corrections, training.

Label Studio, the backend (gunicorn, basic auth on), an RQ worker and Redis all run as real
processes talking HTTP. Images reach the backend from Label Studio itself (uploads and local
files), with the host and token that Label Studio's /setup call gave the backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES
from PIL import Image
from processes import Loop, running_backend, wait_for

from backend.brush import decode_rle, encode_rle
from backend.label_config import label_config_for
from backend.predictions import attention_alpha
from model import load_checkpoint
from model.data import image_transform

from .label_studio import LabelStudioServer

AUTH = ("annotator-bot", "e2e-secret")
CONFIG = label_config_for(CLASSES)
SIZES = [(80, 60), (64, 64), (50, 70)]


@pytest.fixture
def backend(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[Loop]:
    env = {
        "ABN_TRAIN_AFTER": "1000",
        "ABN_FINETUNE_EPOCHS": "2",
        "ABN_SWAP_INTERVAL": "0.2",
        "ABN_GATE_ACCURACY_MARGIN": "1",
        "ABN_GATE_MAP_MARGIN": "1",
        "ABN_GATE_MIN_EVIDENCE": "1",  # rounds of a handful: the gate's statistics are test_round's
    }
    with running_backend(tmp_path, tiny_checkpoint, auth=AUTH, **env) as deployment:
        yield deployment


def make_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def expected_alpha(checkpoint: Path, image: Path) -> tuple[np.ndarray, str]:
    """The brush the backend should send for `image`: the model's map at the image's size."""
    model, meta = load_checkpoint(checkpoint)
    with Image.open(image) as img:
        rgb = img.convert("RGB")
    x = image_transform(meta["image_size"], meta["mean"], meta["std"])(rgb)[None]
    with torch.no_grad():
        out = model(x)
    label = meta["classes"][int(out.perception_logits.argmax())]
    alpha = attention_alpha(out.attention[0, 0].numpy(), rgb.width, rgb.height, levels=8)
    return alpha, label


def results_by_type(prediction: dict) -> dict[str, dict]:
    return {r["type"]: r for r in prediction["result"]}


def test_predictions_corrections_training_through_label_studio(
    label_studio: LabelStudioServer, backend: Loop, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    ls = label_studio
    project = ls.create_project("ABN e2e", CONFIG)
    pid = project["id"]
    images = {}
    for i, size in enumerate(SIZES[:2]):
        path = make_image(tmp_path / f"upload{i}.png", size, i)
        [task_id] = ls.upload_image(pid, path)
        images[task_id] = path
    local_dir = Path(ls.document_root) / "abn-e2e"
    local_dir.mkdir(parents=True, exist_ok=True)
    local = make_image(local_dir / "local.png", SIZES[2], 7)
    ls.add_local_storage(pid, "abn-e2e", r".*\.png")
    for task in ls.tasks(pid):
        if "local-files" in task["data"]["image"]:
            images[task["id"]] = local
    assert len(images) == 3

    ml = ls.connect_ml_backend(pid, backend.base, "ABN", basic_auth=AUTH)
    # The backend adds its basic-auth header to the project webhook Label Studio made for it.
    hooks = wait_for(
        lambda: [
            h
            for h in ls.project_webhooks(pid)
            if h["url"].endswith("/webhook") and h.get("headers", {}).get("Authorization")
        ],
        30,
        "the webhook to carry the backend's auth header",
    )
    assert hooks[0]["headers"]["Authorization"].startswith("Basic ")

    ls.retrieve_predictions(pid)
    for task_id, path in images.items():
        [prediction] = ls.predictions(task_id)
        assert prediction["model_version"] == "v1"
        parts = results_by_type(prediction)
        brush = parts["brushlabels"]
        width, height = Image.open(path).size
        assert (brush["original_width"], brush["original_height"]) == (width, height)
        alpha = decode_rle(brush["value"]["rle"], height, width)
        want, label = expected_alpha(tiny_checkpoint, path)
        np.testing.assert_array_equal(alpha, want)
        assert parts["choices"]["value"]["choices"] == [label]
        assert 0 < prediction["score"] <= 1 and brush["score"] == pytest.approx(prediction["score"])
        assert len(parts["textarea"]["value"]["text"]) == 3  # the top-3, one line each

    # An annotator corrects one brush: paints the left half, erases the rest; another task is
    # confirmed as predicted (no edit), which must not count as a correction.
    corrected_task, confirmed_task = list(images)[:2]
    [prediction] = ls.predictions(corrected_task)
    brush = results_by_type(prediction)["brushlabels"]
    width, height = brush["original_width"], brush["original_height"]
    alpha = np.zeros((height, width), dtype=np.uint8)
    alpha[:, : width // 2] = 255
    edited = {
        **brush,
        "origin": "prediction-changed",
        "value": {**brush["value"], "rle": encode_rle(alpha)},
    }
    choice = {
        "from_name": "class",
        "to_name": "image",
        "type": "choices",
        "value": {"choices": [CLASSES[1]]},
    }
    annotation = ls.create_annotation(corrected_task, [edited, choice])
    [confirmed] = ls.predictions(confirmed_task)
    unedited = [{**r, "origin": "prediction"} for r in confirmed["result"]]
    ls.create_annotation(confirmed_task, unedited)
    summary = wait_for(
        lambda: backend.get("/status")["corrections"].get(str(pid)), 10, "the corrections"
    )
    assert summary == {"corrections": 1, "confirmations": 1, "untrained": 1, "labelled": 2}
    [stored] = [c for c in backend.store().corrections(str(pid)) if c.edited]
    assert stored.annotation_id == annotation["id"] and stored.label == CLASSES[1]
    assert stored.model_version == "v1"
    np.testing.assert_allclose(stored.target[:, :2].mean(), 1.0, atol=0.05)

    # "Start training" in Label Studio: a job fine-tunes the shared v1, passes the gate, and
    # publishes the first version of the project's own lineage.
    backend.start("worker", "worker")
    ls.train(ml["id"])
    own = f"p{pid}-v2"
    wait_for(lambda: backend.registry(str(pid)).current(), 300, own + ": " + backend.log("worker"))
    record = backend.registry(str(pid)).current()
    assert (record["version"], record["parent_version"]) == (own, "v1")
    wait_for(lambda: backend.everyone_serves(own, str(pid)), 5, "the backend to serve " + own)
    assert backend.registry().current()["version"] == "v1"  # the shared model is unchanged

    # Label Studio sees the new version and asks for fresh predictions, made by it.
    ls.retrieve_predictions(pid)
    for task_id in images:
        versions = {p["model_version"] for p in ls.predictions(task_id)}
        assert own in versions, (task_id, versions)
