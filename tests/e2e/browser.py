"""Headless Chromium driving the real Label Studio editor, for the browser end-to-end test.

Playwright's sync API drives Debian's ``chromium`` (``make test`` installs it with apt;
``ABN_CHROMIUM`` names another binary); no browser is downloaded. The helpers do what an
annotator does with a mouse and keyboard, on the page Label Studio serves: log in, open a
task, select a region in the Regions panel, pick a tool, drag a stroke over the image, click a
class, submit. Each step can save a screenshot into the run's folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, Page, sync_playwright

logger = logging.getLogger(__name__)

CHROMIUM = Path(os.environ.get("ABN_CHROMIUM", "/usr/bin/chromium"))
VIEWPORT = {"width": 1400, "height": 1000}
STEP_TIMEOUT_MS = 120_000  # two shared cores: the editor's first load takes a while


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium, closed (with its processes) when the block ends."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
        )
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Editor:
    """One Label Studio page, logged in, with numbered screenshots of each step."""

    page: Page
    base: str
    shots: Path
    taken: list[Path] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)  # ML calls the editor made

    def shot(self, name: str) -> Path:
        """Save a screenshot of the whole page as ``NN-name.png``."""
        path = self.shots / f"{len(self.taken) + 1:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        self.taken.append(path)
        logger.info("screenshot %s", path)
        return path

    def login(self, email: str, password: str) -> None:
        self.page.goto(f"{self.base}/user/login/")
        self.page.fill('input[name="email"]', email)
        self.page.fill('input[name="password"]', password)
        with self.page.expect_navigation():
            self.page.click('button[type="submit"], input[type="submit"]')

    def open_task(self, project: int, task: int) -> None:
        """The labeling editor for one task; returns once the image and its regions are drawn."""
        self.page.goto(f"{self.base}/projects/{project}/data?task={task}")
        self.page.wait_for_selector(".konvajs-content canvas", timeout=STEP_TIMEOUT_MS)
        self.page.wait_for_function(
            '() => { const i = document.querySelector(\'img[alt="LS"], .lsf-image img, '
            "[class*=image] img'); return !i || (i.complete && i.naturalWidth > 0); }",
            timeout=STEP_TIMEOUT_MS,
        )
        self.page.wait_for_timeout(1500)  # the brush mask is decoded after the image

    def auto_annotation(self) -> None:
        """Turn on the toggle an interactive backend offers: every smart tool shows."""
        self.page.get_by_text("Auto-Annotation", exact=True).click()
        self.page.get_by_text("Auto-Accept Suggestions").wait_for(timeout=STEP_TIMEOUT_MS)

    def select_region(self) -> None:
        """Select the first region in the Regions panel (the predicted brush), as an annotator
        does before editing it; waits until its details show."""
        self.page.locator("[class*=outliner] .lsf-labels-list").first.click()
        self.page.get_by_text("Select a region to view its properties").wait_for(state="hidden")

    def smart_tool(self, name: str) -> None:
        """Pick a smart tool (``brush-tool``, ``key-point-tool``). They fold into one button,
        which shows the active tool's settings instead while one of them is active, so the
        move tool is picked first."""
        self.page.locator("[aria-label=move-tool]:visible").first.click()
        self.page.locator(".lsf-tool_smart:visible").first.hover()
        self.page.locator(f".lsf-tool_smart[aria-label={name}]:visible").click()

    def click(self, fx: float, fy: float) -> None:
        """A click on the image at fractions (0..1) of the stage's width and height."""
        box = self.stage_box()
        self.page.mouse.click(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)

    def stage_box(self) -> dict[str, float]:
        """Where the image's drawing stage is on the page (x, y, width, height)."""
        box = self.page.locator(".konvajs-content").first.bounding_box()
        assert box is not None, "the image stage is not visible"
        return box

    def drag(self, points: list[tuple[float, float]]) -> None:
        """A stroke through `points`, given as fractions (0..1) of the stage's width and height."""
        box = self.stage_box()
        xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
        mouse = self.page.mouse
        mouse.move(*xy[0])
        mouse.down()
        for x, y in xy[1:]:
            mouse.move(x, y, steps=8)
        mouse.up()
        self.page.wait_for_timeout(500)

    def press(self, key: str) -> None:
        self.page.keyboard.press(key)
        self.page.wait_for_timeout(300)

    def text(self) -> str:
        return self.page.inner_text("body")

    def find(self, pattern: str) -> bool:
        return re.search(pattern, self.text()) is not None
