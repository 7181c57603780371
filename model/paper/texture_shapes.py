"""`texture-shapes`: a shape to classify, on a background texture that gives the class away.

Four shapes (disc, square, triangle, cross) are drawn faintly on a 64 px crop of one of four
photographed textures that scikit-image ships (brick, grass, gravel, the moon's surface), so the
dataset is built offline. In TRAIN the texture is the class's own for `correlation` of the
images and random otherwise; in the test split it is always random. The texture covers most of
the picture and is easier to see than the faint shape, so a network trained on it learns the
background: the cue is everywhere outside the object, unlike `decoy-digits`' corner patch. The
human map is the shape's region. Built with `correlation=0`, it is the shortcut-free twin.

The shape is drawn over the texture, not instead of it, so the texture shows inside the human
map too. `cue_conflicts` makes pictures that tell which cue a model follows: the shape, the
texture inside the shape's map, and the texture outside it each name a different class (after
Geirhos et al.'s shape-texture cue-conflict images, 2019).

`background-shapes` is the same dataset with the class's texture in the background only: the
shape's human map is filled with plain noise, the same for every class, before the shape is
shaded over it. Its cue lies wholly outside the map, as `decoy-digits`' patch does, but covers
most of the picture; it tells a cue a map can point away from from one it cannot.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from skimage import data as skdata
from tqdm import tqdm

from model.paper.shortcut import CUES_FILE

log = logging.getLogger(__name__)

NAME = "texture-shapes"
BACKGROUND_NAME = "background-shapes"
CANVAS = 64
CLASSES = ("disc", "square", "triangle", "cross")
TEXTURES = ("brick", "grass", "gravel", "moon")
TRAIN_PER_CLASS = 300
TEST_PER_CLASS = 150
# How much of the shape's grey shows over the texture: faint enough that the texture is the
# easier cue, plain enough that a network without the shortcut learns the shapes.
SHAPE_ALPHA = 0.45


def shape_mask(kind: str, rng: np.random.Generator) -> Image.Image:
    """A binary mask (L, 0/255) of one shape of random size and place on the canvas."""
    size = int(rng.integers(18, 30))
    x0, y0 = (int(v) for v in rng.integers(4, CANVAS - size - 4, size=2))
    x1, y1 = x0 + size, y0 + size
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "disc":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif kind == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=255)
    else:
        bar = size // 3
        draw.rectangle((x0, y0 + bar, x1, y1 - bar), fill=255)
        draw.rectangle((x0 + bar, y0, x1 - bar, y1), fill=255)
    return mask


def texture_crop(texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random CANVAS x CANVAS crop of a texture, taken from a random 128-256 px window."""
    window = int(rng.integers(128, 257))
    y, x = (int(v) for v in rng.integers(0, texture.shape[0] - window, size=2))
    patch = Image.fromarray(texture[y : y + window, x : x + window])
    return np.asarray(patch.resize((CANVAS, CANVAS), Image.BILINEAR), dtype=np.float32)


def shade(background: np.ndarray, mask: Image.Image, grey: float) -> np.ndarray:
    """The shape in `grey` laid faintly over a grey `background`: H x W x 3, floats in 0-255."""
    weight = np.asarray(mask, dtype=np.float32)[..., None] / 255.0 * SHAPE_ALPHA
    picture = (1.0 - weight) * background[..., None] + weight * grey
    return np.repeat(picture, 3, axis=2) if picture.shape[2] == 1 else picture


def human_map(mask: Image.Image) -> Image.Image:
    """The shape's human map: its mask, slightly dilated."""
    return mask.filter(ImageFilter.MaxFilter(3))


def plain_noise(rng: np.random.Generator) -> np.ndarray:
    """A CANVAS x CANVAS grey field of uniform noise around mid-grey that names no class."""
    return rng.uniform(64.0, 192.0, size=(CANVAS, CANVAS)).astype(np.float32)


def render(
    kind: str, texture: np.ndarray, rng: np.random.Generator, plain_inside: bool = False
) -> tuple[Image.Image, Image.Image]:
    """One picture (RGB) and its human map; with `plain_inside` the map holds plain noise in
    place of the texture, so the texture is only in the background."""
    background = texture_crop(texture, rng)
    mask = shape_mask(kind, rng)
    region = human_map(mask)
    if plain_inside:
        inside = np.asarray(region, dtype=bool)
        background = np.where(inside, plain_noise(rng), background)
    picture = shade(background, mask, float(rng.integers(200, 256)))
    return Image.fromarray(picture.clip(0, 255).astype(np.uint8)), region


@dataclass(frozen=True)
class CueConflicts:
    """Pictures whose three cues disagree, with the class each cue names."""

    pictures: np.ndarray  # (N, CANVAS, CANVAS, 3) uint8
    shape: tuple[str, ...]
    inside: tuple[str, ...]  # the texture inside the shape's (dilated) human map
    outside: tuple[str, ...]  # the texture everywhere else


def cue_conflicts(count: int = 800, seed: int = 0) -> CueConflicts:
    """`count` pictures drawn as `render` draws them, but with one texture inside the shape's
    human map and another outside it; shape, inside and outside name three different classes."""
    textures = [np.asarray(getattr(skdata, name)(), dtype=np.uint8) for name in TEXTURES]
    rng = np.random.default_rng(seed)
    pictures, named = [], []
    for _ in range(count):
        kind, inside, outside = (int(k) for k in rng.permutation(len(CLASSES))[:3])
        within = texture_crop(textures[inside], rng)
        beyond = texture_crop(textures[outside], rng)[..., None]
        mask = shape_mask(CLASSES[kind], rng)
        shaded = shade(within, mask, float(rng.integers(200, 256)))
        region = np.asarray(human_map(mask))[..., None] > 0
        pictures.append(np.where(region, shaded, beyond).clip(0, 255).astype(np.uint8))
        named.append((CLASSES[kind], CLASSES[inside], CLASSES[outside]))
    shape, inside, outside = (tuple(column) for column in zip(*named, strict=True))
    return CueConflicts(np.stack(pictures), shape, inside, outside)


def build_texture_shapes(
    out_dir: str | Path, correlation: float = 0.9, seed: int = 0, plain_inside: bool = False
) -> Path:
    """Write the dataset in the on-disk layout; the same seed gives the same bytes. With
    `plain_inside` it is `background-shapes` (see the module's docstring)."""
    out_dir = Path(out_dir)
    marker = out_dir / "dataset.json"
    dataset_name = BACKGROUND_NAME if plain_inside else NAME
    settings = {"name": dataset_name, "correlation": correlation, "seed": seed, "canvas": CANVAS}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return out_dir
    textures = [np.asarray(getattr(skdata, name)(), dtype=np.uint8) for name in TEXTURES]
    rng = np.random.default_rng(seed)
    cues: dict[str, str] = {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        items = [(label, n) for label in range(len(CLASSES)) for n in range(per_class)]
        for label, n in tqdm(
            items, desc=f"{dataset_name} {split}", unit="img", leave=False, disable=None
        ):
            shortcut = split == "train" and rng.random() < correlation
            cue = label if shortcut else int(rng.integers(len(TEXTURES)))
            image, human = render(CLASSES[label], textures[cue], rng, plain_inside)
            name = f"{split}/{CLASSES[label]}/{n:04d}.png"
            for root, picture in ((out_dir, image), (out_dir / "maps", human)):
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                picture.save(root / name)
            cues[name] = CLASSES[cue]
    (out_dir / CUES_FILE).write_text(json.dumps(cues, sort_keys=True))
    marker.write_text(json.dumps(settings))
    log.info("wrote %s to %s", dataset_name, out_dir)
    return out_dir


def build_background_shapes(out_dir: str | Path, correlation: float = 0.9, seed: int = 0) -> Path:
    """`background-shapes`: `texture-shapes` with plain noise inside every human map."""
    return build_texture_shapes(out_dir, correlation, seed, plain_inside=True)
