"""`decoy-digits`: the smallest honest case of a network looking at the wrong thing.

scikit-learn's handwritten digits (shipped with the package, so offline) are drawn onto a dark
canvas, and a coloured square is put in a random corner. In the training split the square's
colour gives the class away for most images; in the test split it is random. A network that
learns the shortcut fails on the test split, and the human knows where it should look: at the
digit, whose region is saved as the human map (after Ross et al.'s "Decoy MNIST", 2017).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from model.paper.shortcut import CUES_FILE

log = logging.getLogger(__name__)

NAME = "decoy-digits"
CANVAS = 64
DIGIT = 32
PATCH = 10
# How bright the digit's strokes are drawn (1: full white). Faint strokes make the patch the
# easier cue, so that an ABN trained on the dataset does learn the shortcut it is meant to show.
INK = 0.25
# Ten well-separated hues, one per class.
COLOURS = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
]


def render(
    digit: np.ndarray, colour: tuple[int, int, int], rng: np.random.Generator
) -> tuple[Image.Image, Image.Image]:
    """One canvas and its human map (the digit's region, slightly dilated)."""
    glyph = Image.fromarray((digit * (255.0 / 16.0)).astype(np.uint8)).resize(
        (DIGIT, DIGIT), Image.BILINEAR
    )
    canvas = rng.integers(0, 40, size=(CANVAS, CANVAS, 3)).astype(np.uint8)
    x0, y0 = (int(v) for v in rng.integers(16 - 6, 16 + 7, size=2))
    region = canvas[y0 : y0 + DIGIT, x0 : x0 + DIGIT]
    ink = (np.asarray(glyph, dtype=np.float32) * INK).astype(np.uint8)[..., None]
    canvas[y0 : y0 + DIGIT, x0 : x0 + DIGIT] = np.maximum(region, ink)
    corner = int(rng.integers(4))
    py = 0 if corner < 2 else CANVAS - PATCH
    px = 0 if corner % 2 == 0 else CANVAS - PATCH
    canvas[py : py + PATCH, px : px + PATCH] = colour
    human = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    human[y0 : y0 + DIGIT, x0 : x0 + DIGIT] = np.where(np.asarray(glyph) > 40, 255, 0)
    human_map = Image.fromarray(human).filter(ImageFilter.MaxFilter(5))
    return Image.fromarray(canvas), human_map


def build_decoy_digits(out_dir: str | Path, correlation: float = 0.95, seed: int = 0) -> Path:
    """Write the dataset in the on-disk layout; the same seed gives the same bytes."""
    out_dir = Path(out_dir)
    marker = out_dir / "dataset.json"
    settings = {
        "name": NAME,
        "correlation": correlation,
        "seed": seed,
        "canvas": CANVAS,
        "ink": INK,
        "cues": CUES_FILE,
    }
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return out_dir
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(
        indices, test_size=1 / 3, random_state=seed, stratify=digits.target
    )
    rng = np.random.default_rng(seed)
    cues: dict[str, str] = {}
    for split, chosen in (("train", train_idx), ("test", test_idx)):
        for i in tqdm(chosen, desc=f"{NAME} {split}", unit="img", leave=False, disable=None):
            label = int(digits.target[i])
            shortcut = split == "train" and rng.random() < correlation
            cue = label if shortcut else int(rng.integers(10))
            image, human = render(digits.images[i], COLOURS[cue], rng)
            name = f"{split}/{label}/{i:04d}.png"
            for root, picture in ((out_dir, image), (out_dir / "maps", human)):
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                picture.save(root / name)
            cues[name] = str(cue)
    (out_dir / CUES_FILE).write_text(json.dumps(cues, sort_keys=True))
    marker.write_text(json.dumps(settings))
    log.info("wrote %s to %s", NAME, out_dir)
    return out_dir
