"""An annotator in a real browser: headless Chromium drives Label Studio 1.23.2's editor.

Label Studio, the backend, its worker and Redis run as real processes; Chromium (Debian's
``chromium``, driven by Playwright) does what an annotator does with the mouse and keyboard on
the config ``abn label-config`` prints: the task opens with the predicted brush drawn, the
region is selected in the Regions panel, one area is painted and another erased, the class is
changed by its hotkey, the annotation is submitted. The stored correction must then have moved
where the strokes went, and the worker must record the top-3 the model gives with that map.

Screenshots of each step go to ``$ABN_BROWSER_SHOTS`` or ``runs/browser-e2e/<timestamp>/``.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES
from PIL import Image, ImageDraw
from processes import ROOT, Loop, running_backend, wait_for

from backend.brush import decode_rle
from backend.corrections import alpha_to_map
from backend.label_config import CLASS_HOTKEYS, label_config_for
from model import load_checkpoint
from model.edited_map import predict_with_map

from .browser import Editor, chromium
from .label_studio import LabelStudioServer

pytestmark = pytest.mark.slow

SIDE = 320  # image pixels a side: big enough for a stroke of the largest brush to be solid
MAP = 4  # the tiny checkpoint's attention map is 4x4: one cell is 80x80 image pixels
MARGIN = 0.045  # strokes stay this far (a fraction of the image) inside their cell
ROWS = 6  # passes of a serpentine stroke: at size 50 they overlap, so the cell is filled


@pytest.fixture
def backend(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[Loop]:
    env = {
        "ABN_TRAIN_AFTER": "1000",  # a round only on Start Training
        "ABN_FINETUNE_EPOCHS": "1",
        "ABN_SWAP_INTERVAL": "0.2",
    }
    with running_backend(tmp_path, tiny_checkpoint, **env) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def shots() -> Path:
    """This run's screenshot folder (kept: it is what a reviewer looks at)."""
    base = os.environ.get("ABN_BROWSER_SHOTS")
    folder = Path(base) if base else ROOT / "runs" / "browser-e2e" / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def photo(path: Path) -> Path:
    """A smooth grey picture with a dark disc: the translucent brush shows up on it."""
    ramp = np.linspace(90, 220, SIDE, dtype=np.float32)
    grey = (ramp[None, :] * 0.6 + ramp[:, None] * 0.4).astype(np.uint8)
    img = Image.fromarray(np.stack([grey] * 3, axis=-1))
    ImageDraw.Draw(img).ellipse((110, 120, 210, 220), fill=(40, 40, 60))
    img.save(path)
    return path


def cell_box(row: int, col: int) -> tuple[float, float, float, float]:
    """The part of a map cell, as fractions of the image, that a stroke may cover."""
    return (
        col / MAP + MARGIN,
        row / MAP + MARGIN,
        (col + 1) / MAP - MARGIN,
        (row + 1) / MAP - MARGIN,
    )


def serpentine(box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """One stroke that sweeps a box row by row."""
    x0, y0, x1, y1 = box
    points = []
    for i in range(ROWS):
        y = y0 + (y1 - y0) * i / (ROWS - 1)
        points += [(x0, y), (x1, y)] if i % 2 == 0 else [(x1, y), (x0, y)]
    return points


def stage_pixels(editor: Editor) -> np.ndarray:
    png = editor.page.locator(".konvajs-content").first.screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


def test_an_annotator_edits_the_map_in_the_browser(
    label_studio: LabelStudioServer,
    backend: Loop,
    tiny_checkpoint: Path,
    tmp_path: Path,
    shots: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.monotonic()
    with capsys.disabled():
        print(f"\nbrowser e2e screenshots: {shots}")
    ls = label_studio
    pid = ls.create_project("ABN browser e2e", label_config_for(CLASSES))["id"]
    image = photo(tmp_path / "photo.png")
    [task_id] = ls.upload_image(pid, image)
    ml = ls.connect_ml_backend(pid, backend.base, "ABN")
    ls.retrieve_predictions(pid)
    [prediction] = ls.predictions(task_id)
    brush = next(r for r in prediction["result"] if r["type"] == "brushlabels")
    predicted_class = next(r for r in prediction["result"] if r["type"] == "choices")
    predicted = alpha_to_map(decode_rle(brush["value"]["rle"], SIDE, SIDE), MAP)
    # Paint where the model looks least, erase where it looks most: both must be able to move.
    low = np.unravel_index(np.argmin(predicted), predicted.shape)
    high = np.unravel_index(np.argmax(predicted), predicted.shape)
    assert low != high and predicted[low] < 0.8 and predicted[high] > 0.2, predicted
    label = predicted_class["value"]["choices"][0]
    other = next(c for c in CLASSES if c != label)

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        editor = Editor(page, ls.url, shots)
        editor.login(ls.email, ls.password)
        editor.open_task(pid, task_id)
        editor.shot("task-opened")
        # The predicted brush is drawn: hiding every region changes the picture.
        shown = stage_pixels(editor)
        editor.press("Control+h")
        hidden = stage_pixels(editor)
        editor.press("Control+h")
        assert np.abs(shown - hidden).mean() > 5, "the predicted brush is not drawn"
        assert editor.find(r"1\. \w+\s+\d+\.\d%"), "the top-3 lines are not shown"
        assert page.locator("[data-testid=textarea-input]").count() == 0  # no box to type in

        page.locator("[class*=outliner] .lsf-labels-list").first.click()
        page.wait_for_timeout(500)
        assert not editor.find("Select a region to view its properties"), "no region selected"
        editor.shot("region-selected")

        for _ in range(7):  # brush size 15 -> 50, the largest
            editor.press("]")
        editor.drag(serpentine(cell_box(*low)))
        editor.shot("painted")
        editor.press("e")  # the eraser
        for _ in range(7):
            editor.press("]")
        editor.drag(serpentine(cell_box(*high)))
        editor.shot("erased")

        editor.press(CLASS_HOTKEYS[CLASSES.index(other)])
        editor.shot("class-changed")
        page.get_by_role("button", name="Submit").click()
        page.get_by_text("Annotation saved successfully", exact=True).first.wait_for(timeout=60_000)
        editor.shot("submitted")

    [stored] = wait_for(
        lambda: [c for c in backend.store().corrections(str(pid)) if c.task_id == task_id],
        30,
        "the submitted correction in the backend's store",
    )
    assert stored.edited and stored.label == other and stored.model_version == "v1"
    target = stored.target
    # Higher where painted, lower where erased, and the untouched cells as predicted.
    assert target[low] > predicted[low] + 0.6 * (1 - predicted[low]), (target, predicted)
    assert target[high] < 0.4 * predicted[high], (target, predicted)
    untouched = np.ones_like(predicted, dtype=bool)
    untouched[low] = untouched[high] = False
    np.testing.assert_allclose(target[untouched], predicted[untouched], atol=0.03)

    # Start Training: the worker records the top-3 the served model gives with that map.
    backend.start("worker", "worker")
    ls.train(ml["id"])
    recorded = wait_for(
        lambda: backend.store().edited_top3(str(pid)).get(stored.annotation_id),
        300,
        "the edited-map top-3: " + backend.log("worker"),
    )
    model, meta = load_checkpoint(tiny_checkpoint)
    with Image.open(image) as img:
        want = predict_with_map(model, meta, img.convert("RGB"), target).top
    assert recorded["model_version"] == "v1"
    assert [name for name, _ in recorded["top3"]] == [name for name, _ in want]
    np.testing.assert_allclose([p for _, p in recorded["top3"]], [p for _, p in want], atol=1e-4)
    job = wait_for(
        lambda: backend.get(f"/status?project={pid}")["last_jobs"].get(str(pid)),
        300,
        "the round's record: " + backend.log("worker"),
    )
    assert job["edited_top3"][str(stored.annotation_id)] == [
        [name, round(p, 4)] for name, p in recorded["top3"]
    ]
    with capsys.disabled():
        print(f"browser e2e: {time.monotonic() - started:.0f} s, screenshots in {shots}")


CHECK = (
    '  <KeyPointLabels name="check" toName="image" smart="true" smartOnly="true">\n'
    '    <Label value="Check my map" background="#2d7dff" hotkey="j"/>\n'
    "  </KeyPointLabels>\n"
)


def test_an_interactive_backend_hears_of_no_brush_stroke(
    label_studio: LabelStudioServer, backend: Loop, tmp_path: Path, shots: Path
) -> None:
    """What Label Studio 1.23.2 sends an interactive backend while the map is edited (see
    docs/loop.md, section 5): a brush stroke, even with the smart brush and Auto-Annotation on,
    saves a draft and calls nothing; a smart key point does call interactive-annotating, with
    only itself as the context, once the regions are hidden (else the click selects the brush)."""
    ls = label_studio
    config = label_config_for(CLASSES).replace("</View>", CHECK + "</View>")
    pid = ls.create_project("ABN interactive probe", config)["id"]
    [task_id] = ls.upload_image(pid, photo(tmp_path / "photo.png"))
    ls.connect_ml_backend(pid, backend.base, "ABN", is_interactive=True)
    ls.retrieve_predictions(pid)
    folder = shots / "interactive"
    folder.mkdir()
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        editor = Editor(page, ls.url, folder)
        calls: list[tuple[str, str]] = []
        page.on(
            "request",
            lambda r: calls.append((r.method, r.url)) if "/api/" in r.url else None,
        )
        editor.login(ls.email, ls.password)
        editor.open_task(pid, task_id)
        page.get_by_text("Auto-Annotation", exact=True).click()
        page.get_by_text("Auto-Accept Suggestions").wait_for()
        smart = page.locator(".lsf-tool_smart:visible").first
        smart.hover()
        page.locator(".lsf-tool_smart[aria-label=brush-tool]:visible").click()
        editor.press("a")  # the Attention label: a smart-brush stroke makes a new region
        calls.clear()
        # The stroke is taken: the editor autosaves it as the user's draft (within seconds).
        with page.expect_request(lambda r: "/drafts" in r.url, timeout=60_000):
            editor.drag(serpentine(cell_box(1, 1)))
        page.wait_for_timeout(3000)  # the editor waits 1.2 s after a brush region is drawn
        editor.shot("smart-brush-stroke")
        assert not [url for _, url in calls if "interactive-annotating" in url], calls

        # The smart tools fold into one button; with one of them active it shows that tool's
        # settings instead, so another tool is picked first.
        page.locator("[aria-label=move-tool]:visible").first.click()
        smart.hover()
        page.locator(".lsf-tool_smart[aria-label=key-point-tool]:visible").click()
        page.get_by_text("Check my map", exact=True).click()
        editor.press("Control+h")  # hide the regions, so the click is not taken by the brush
        box = editor.stage_box()
        with page.expect_request(lambda r: "interactive-annotating" in r.url) as asked:
            page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
        body = asked.value.post_data_json
        assert body["task"] == task_id
        assert [r["type"] for r in body["context"]["result"]] == ["keypointlabels"]
        reply = asked.value.response()
        assert reply is not None and reply.ok
        assert reply.json()["data"]["result"]  # Label Studio passed on what /predict answered
        editor.press("Control+h")
        editor.shot("check-point")
