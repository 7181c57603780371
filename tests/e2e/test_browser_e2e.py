"""An annotator in a real browser: headless Chromium drives Label Studio 1.23.2's editor.

Label Studio, the backend, its worker and Redis run as real processes; Chromium (Debian's
``chromium``, driven by Playwright) does what an annotator does with the mouse and keyboard on
the config ``abn label-config`` prints: the task opens with the predicted brush drawn, the
region is selected in the Regions panel, one area is painted and another erased, the class is
changed by its hotkey, the annotation is submitted. The stored correction must then have moved
where the strokes went, and the worker must record the top-3 the model gives with that map.
With the backend connected as interactive, the annotator also checks an edited map before
submitting ("check my map", docs/loop.md section 5): the top-3 box must then show the top-3
the model gives with the drafted map; and a brush stroke must reach the backend only as a draft.

Screenshots of each step go to ``$ABN_BROWSER_SHOTS`` or ``runs/browser-e2e/<timestamp>/``.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CLASSES
from PIL import Image, ImageDraw
from processes import ROOT, Loop, running_backend, wait_for

from backend.brush import decode_rle
from backend.corrections import Correction, alpha_to_map, brush_alpha, most_recent
from backend.label_config import (
    CHECK_HOTKEY,
    CHECK_LABEL,
    CLASS_HOTKEYS,
    check_config,
    label_config_for,
)
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


def cells_to_edit(prediction: dict[str, Any]) -> tuple[np.ndarray, tuple, tuple]:
    """The predicted map, and the cells to paint (where the model looks least) and to erase
    (where it looks most): both must be able to move."""
    predicted = predicted_map(prediction)
    low = np.unravel_index(np.argmin(predicted), predicted.shape)
    high = np.unravel_index(np.argmax(predicted), predicted.shape)
    assert low != high and predicted[low] < 0.8 and predicted[high] > 0.2, predicted
    return predicted, low, high


def predicted_map(prediction: dict[str, Any]) -> np.ndarray:
    brush = next(r for r in prediction["result"] if r["type"] == "brushlabels")
    return alpha_to_map(decode_rle(brush["value"]["rle"], SIDE, SIDE), MAP)


def telling_edit(predicted: np.ndarray, checkpoint: Path, image: Path) -> tuple[tuple, tuple]:
    """The cell to paint and the cell to erase that move the model's top-1 probability most,
    so that the top-3 with the edited map must differ from the model's own."""
    model, meta = load_checkpoint(checkpoint)
    with Image.open(image) as img:
        rgb = img.convert("RGB")
    own = predict_with_map(model, meta, rgb, predicted).top[0][1]
    cells = [tuple(int(i) for i in c) for c in np.ndindex(predicted.shape)]
    moves = []
    for low in (c for c in cells if predicted[c] < 0.8):
        for high in (c for c in cells if predicted[c] > 0.2 and c != low):
            edited = predicted.copy()
            edited[low], edited[high] = 1.0, 0.0
            moves.append(
                (abs(predict_with_map(model, meta, rgb, edited).top[0][1] - own), low, high)
            )
    change, low, high = max(moves)
    assert change > 0.01, f"no edit moves the top-1 by a point: {moves}"
    return low, high


def paint_and_erase(editor: Editor, low: tuple, high: tuple) -> None:
    """With the predicted region selected: paint one cell, erase another, at the largest size."""
    for _ in range(7):  # brush size 15 -> 50, the largest
        editor.press("]")
    editor.drag(serpentine(cell_box(*low)))
    editor.shot("painted")
    editor.press("e")  # the eraser
    for _ in range(7):
        editor.press("]")
    editor.drag(serpentine(cell_box(*high)))
    editor.shot("erased")


def submit(editor: Editor) -> None:
    """Submit, and wait for the editor to say it is saved (the webhook has been sent)."""
    editor.page.get_by_role("button", name="Submit").click()
    saved = editor.page.get_by_text("Annotation saved successfully", exact=True).first
    saved.wait_for(timeout=60_000)
    editor.shot("submitted")


def stored_correction(backend: Loop, project: int, task_id: int) -> Correction:
    [stored] = wait_for(
        lambda: [c for c in backend.store().corrections(str(project)) if c.task_id == task_id],
        30,
        "the submitted correction in the backend's store",
    )
    return stored


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
    predicted_class = next(r for r in prediction["result"] if r["type"] == "choices")
    predicted, low, high = cells_to_edit(prediction)
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

        editor.select_region()
        editor.shot("region-selected")
        paint_and_erase(editor, low, high)

        editor.press(CLASS_HOTKEYS[CLASSES.index(other)])
        editor.shot("class-changed")
        submit(editor)

    stored = stored_correction(backend, pid, task_id)
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


def test_an_interactive_backend_hears_of_no_brush_stroke(
    label_studio: LabelStudioServer, backend: Loop, tmp_path: Path, shots: Path
) -> None:
    """What Label Studio 1.23.2 sends an interactive backend while the map is edited (see
    docs/loop.md, section 5): a brush stroke, even with the smart brush and Auto-Annotation on,
    saves a draft and calls nothing; a smart key point does call interactive-annotating, with
    only itself as the context, once the regions are hidden (else the click selects the brush)."""
    ls = label_studio
    pid = ls.create_project("ABN interactive probe", label_config_for(CLASSES))["id"]
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
        editor.auto_annotation()
        editor.smart_tool("brush-tool")
        editor.press("a")  # the Attention label: a smart-brush stroke makes a new region
        calls.clear()
        # The stroke is taken: the editor autosaves it as the user's draft (within seconds).
        with page.expect_request(lambda r: "/drafts" in r.url, timeout=60_000):
            editor.drag(serpentine(cell_box(1, 1)))
        page.wait_for_timeout(3000)  # the editor waits 1.2 s after a brush region is drawn
        editor.shot("smart-brush-stroke")
        assert not [url for _, url in calls if "interactive-annotating" in url], calls

        editor.smart_tool("key-point-tool")
        page.get_by_text(CHECK_LABEL, exact=True).click()
        editor.press("Control+h")  # hide the regions, so the click is not taken by the brush
        with page.expect_request(lambda r: "interactive-annotating" in r.url) as asked:
            editor.click(0.5, 0.5)
        body = asked.value.post_data_json
        assert body["task"] == task_id
        assert [r["type"] for r in body["context"]["result"]] == ["keypointlabels"]
        reply = asked.value.response()
        assert reply is not None and reply.ok
        assert reply.json()["data"]["result"]  # Label Studio passed on what /predict answered
        editor.press("Control+h")
        editor.shot("check-point")


def drafted_map(ls: LabelStudioServer, task_id: int) -> np.ndarray | None:
    """The attention map of the user's latest draft as Label Studio keeps it, merged as the
    backend merges it; None while there is no draft with a brush."""
    draft = most_recent(ls.drafts(task_id))
    targets = check_config(label_config_for(CLASSES), CLASSES)
    merged = brush_alpha(draft["result"], targets) if draft else None
    return None if merged is None else alpha_to_map(merged[0], MAP)


def erased_draft(
    ls: LabelStudioServer, task_id: int, cell: tuple, below: float
) -> tuple[np.ndarray] | None:
    """The drafted map once the erased `cell` is below `below` in it (the last stroke saved)."""
    drafted = drafted_map(ls, task_id)
    return (drafted,) if drafted is not None and drafted[cell] < below else None


def playwright_key(hotkey: str) -> str:
    """A Label Studio hotkey (``shift+c``) as Playwright presses it (``Shift+KeyC``)."""
    *modifiers, key = hotkey.split("+")
    name = f"Key{key.upper()}" if len(key) == 1 and key.isalpha() else key
    return "+".join([*(m.capitalize() for m in modifiers), name])


def percentages(lines: list[str]) -> list[tuple[str, float]]:
    """``1. cat  43.5%`` lines back to (class, percent)."""
    parsed = [line.split() for line in lines]
    return [(words[1], float(words[2].rstrip("%"))) for words in parsed]


def test_an_annotator_checks_the_edited_map_in_the_browser(
    label_studio: LabelStudioServer,
    backend: Loop,
    tiny_checkpoint: Path,
    tmp_path: Path,
    shots: Path,
) -> None:
    """Check my map (docs/loop.md, section 5): with the backend interactive and Auto-Annotation
    on, the annotator edits the brush (a draft is saved), hides the regions, clicks a check
    point; the top-3 box then shows the top-3 the served model gives with the drafted map."""
    ls = label_studio
    pid = ls.create_project("ABN check my map", label_config_for(CLASSES))["id"]
    image = photo(tmp_path / "photo.png")
    [task_id] = ls.upload_image(pid, image)
    ls.connect_ml_backend(pid, backend.base, "ABN", is_interactive=True)
    ls.retrieve_predictions(pid)
    [prediction] = ls.predictions(task_id)
    predicted = predicted_map(prediction)
    low, high = telling_edit(predicted, tiny_checkpoint, image)
    own = next(r for r in prediction["result"] if r["type"] == "textarea")["value"]["text"]
    folder = shots / "check-my-map"
    folder.mkdir()
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        editor = Editor(page, ls.url, folder)
        editor.login(ls.email, ls.password)
        editor.open_task(pid, task_id)
        editor.auto_annotation()
        editor.shot("auto-annotation-on")
        editor.select_region()
        paint_and_erase(editor, low, high)
        # The editor autosaves the draft a few seconds after an edit: wait until Label
        # Studio holds one with both strokes in it.
        (drafted,) = wait_for(
            lambda: erased_draft(ls, task_id, high, 0.4 * predicted[high]),
            60,
            "a draft with the erased cell",
        )
        editor.shot("draft-saved")

        # The label alone does not switch to its tool: the smart key point is picked from the
        # smart tools' button (the last of the toolbar), then its label by its hotkey.
        editor.smart_tool("key-point-tool")
        editor.press(playwright_key(CHECK_HOTKEY))
        editor.press("Control+h")  # hide the regions, so the click is not taken by the brush
        editor.shot("check-tool")
        with page.expect_response(lambda r: "interactive-annotating" in r.url) as asked:
            editor.click(0.5, 0.5)
        [answer] = asked.value.json()["data"]["result"]
        lines = answer["value"]["text"]
        assert lines[0].startswith("With your map the model says "), lines
        for line in lines:  # the top-3 box shows them, in place of the model's own
            page.get_by_text(line, exact=True).wait_for(timeout=30_000)
        editor.shot("checked")
        editor.press("Control+h")  # hides the new point too: not all were hidden
        editor.press("Control+h")  # shows them all
        editor.shot("checked-regions-shown")
        assert np.array_equal(drafted_map(ls, task_id), drafted)  # the check left the brush
        submit(editor)

    # The backend painted the draft's strokes as the editor paints them on submission.
    stored = stored_correction(backend, pid, task_id)
    np.testing.assert_allclose(drafted, stored.target, atol=0.03)
    model, meta = load_checkpoint(tiny_checkpoint)
    with Image.open(image) as img:
        want = predict_with_map(model, meta, img.convert("RGB"), drafted).top
        submitted = predict_with_map(model, meta, img.convert("RGB"), stored.target).top
    shown = percentages(lines[1:4])
    assert [name for name, _ in shown] == [name for name, _ in want]
    np.testing.assert_allclose([p for _, p in shown], [100 * p for _, p in want], atol=0.051)
    np.testing.assert_allclose([p for _, p in shown], [100 * p for _, p in submitted], atol=0.5)
    assert lines[1:4] != own, "the edit did not change the top-3: the check shows nothing new"
    assert lines[4] == "With its own map: " + "   ".join(own)
