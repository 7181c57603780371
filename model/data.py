"""Datasets on disk: an ImageFolder split, plus the human maps that mirror it.

Layout (README.md, "Dataset layout")::

    DIR/train/<class>/<name>.png|jpg      DIR/maps/train/<class>/<name>.png
    DIR/test/<class>/<name>.png|jpg       DIR/maps/test/<class>/<name>.png

A sample without a map is still a sample: fine-tuning gives it the classification losses only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms

from model.errors import UserError
from model.maps import load_map_image, map_size_for

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class DatasetError(UserError, ValueError):
    """A dataset that cannot be used as asked: a missing split, foreign classes, a bad file."""


@dataclass(frozen=True)
class Sample:
    image: Path
    label: int
    map: Path | None


def find_classes(data_dir: str | Path) -> list[str]:
    """Class names in output order: the sorted folder names of the train split."""
    train = Path(data_dir) / "train"
    if not train.is_dir():
        raise DatasetError(f"{train} does not exist: a dataset needs DIR/train/<class>/...")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{train} holds no class folders")
    return classes


def list_samples(data_dir: str | Path, split: str, classes: list[str]) -> list[Sample]:
    """Every image of `split`, with its map where DIR/maps/<split>/... has one."""
    root = Path(data_dir) / split
    if not root.is_dir():
        raise DatasetError(f"{root} does not exist: the dataset has no {split!r} split")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    foreign = sorted(set(found) - set(classes))
    if foreign:
        raise DatasetError(
            f"{root} has classes the model does not know: {foreign} (model classes: {classes})"
        )
    maps_root = Path(data_dir) / "maps" / split
    samples = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for image in sorted(folder.iterdir()):
            if image.suffix.lower() in IMAGE_EXTENSIONS:
                map_path = maps_root / name / f"{image.stem}.png"
                samples.append(Sample(image, label, map_path if map_path.is_file() else None))
    if not samples:
        raise DatasetError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return samples


def unreadable_files(paths: Iterable[Path]) -> list[Path]:
    """Files that do not decode as images, so a run can name them all before it starts."""
    bad = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.verify()
        except (OSError, UnidentifiedImageError):
            bad.append(path)
    return bad


def image_transform(
    image_size: int, mean: list[float], std: list[float], train: bool = False
) -> transforms.Compose:
    """Square resize and normalisation; training adds the usual crop-and-flip augmentation."""
    steps: list = (
        [
            transforms.RandomResizedCrop(image_size, scale=(0.6, 1.0)),
            transforms.RandomHorizontalFlip(),
        ]
        if train
        else [transforms.Resize((image_size, image_size))]
    )
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def open_rgb(path: str | Path) -> Image.Image:
    """An image as RGB, or a DatasetError that names the file."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"{path}: cannot decode image ({exc})") from exc


class AttentionDataset(Dataset):
    """One split: (image, label, human map at the map size, whether the map exists)."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        classes: list[str],
        image_size: int,
        mean: list[float],
        std: list[float],
        train: bool = False,
    ) -> None:
        self.samples = list_samples(data_dir, split, classes)
        self.classes = classes
        self.map_size = map_size_for(image_size)
        self.transform = image_transform(image_size, mean, std, train=train)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [s.label for s in self.samples]

    def has_maps(self) -> bool:
        return any(s.map is not None for s in self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor, bool]:
        sample = self.samples[index]
        image = self.transform(open_rgb(sample.image))
        if sample.map is None:
            return image, sample.label, torch.zeros(1, self.map_size, self.map_size), False
        human = load_map_image(sample.map, self.map_size)[None]
        return image, sample.label, human, True


class InMemoryMapsDataset(Dataset):
    """Prepared tensors as a fine-tuning dataset (the backend's corrections arrive this way)."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor, has_map: torch.Tensor
    ) -> None:
        if not len(images) == len(labels) == len(maps) == len(has_map):
            raise ValueError("images, labels, maps and has_map must have the same length")
        self.images, self.labels, self.maps, self.has_map = images, labels, maps, has_map

    def __len__(self) -> int:
        return len(self.images)

    def has_maps(self) -> bool:
        return bool(self.has_map.any())

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor, bool]:
        return (
            self.images[index],
            int(self.labels[index]),
            self.maps[index],
            bool(self.has_map[index]),
        )
