"""The paper's evaluation (section 5) of one or more checkpoints on a dataset's test split.

For each model: top-1/top-5 accuracy; RISE deletion and insertion scored with the method's own
map; the mean squared error between that map and the human map where the dataset has one. A plain
ResNet yields three methods ("resnet" for accuracy, "cam" and "gradcam" for its maps); an ABN
yields "abn", and an ABN fine-tuned with human maps yields "proposed" (the method names of
``metrics.json``, docs/results/README.md).

`run_evaluation` keeps the mean curves and example maps the report draws; `evaluate_checkpoints`
returns only the ``metrics.json`` dictionary, for notebooks and scripts.
Methods that were not run, and map metrics without human maps, are absent, never zero.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from model.abn import ABN
from model.checkpoint import CheckpointMeta, load_checkpoint
from model.data import AttentionDataset, DatasetError, Sample, list_samples, unreadable_files
from model.metrics import CurveResult, DeletionInsertion, map_mse, topk_accuracy
from model.paper.saliency import cam_maps, gradcam_maps
from model.train import TrainConfig

log = logging.getLogger(__name__)

ROLES = ("resnet", "abn", "proposed")
METHODS = ("resnet", "cam", "gradcam", "abn", "proposed")
METRIC_KEYS = ("top1", "top5", "deletion", "insertion", "map_mse")
MAP_METHODS = {"resnet": ("cam", "gradcam"), "abn": ("abn",), "proposed": ("proposed",)}

__all__ = [
    "METHODS",
    "Candidate",
    "Evaluation",
    "MethodResult",
    "candidate_from_checkpoint",
    "evaluate_checkpoints",
    "load_test_samples",
    "paired_top1",
    "parse_checkpoint_spec",
    "role_of",
    "run_evaluation",
]


# --------------------------------------------------------------------------------------------
# What is evaluated
# --------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """A model to evaluate, the role it plays in the paper's tables, and where it came from."""

    role: str
    model: nn.Module
    meta: CheckpointMeta
    source: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {', '.join(ROLES)}")
        kind = self.meta.get("kind")
        if (self.role == "resnet") != (kind == "resnet"):
            raise ValueError(
                f"{self.source or 'model'}: a {kind} checkpoint cannot play {self.role!r}"
            )


def role_of(meta: CheckpointMeta) -> str:
    """The role a checkpoint's record implies: plain ResNet, ABN as trained, or fine-tuned ABN.

    Fine-tuning (model.train.finetune) records its gamma and the parent's settings; a trained
    ABN has neither.
    """
    if meta.get("kind") == "resnet":
        return "resnet"
    settings = meta.get("settings") or {}
    finetuned = "gamma" in settings or settings.get("finetuned_from") is not None
    return "proposed" if finetuned or meta.get("parent_version") else "abn"


def parse_checkpoint_spec(spec: str) -> tuple[str | None, Path]:
    """``PATH`` or ``NAME=PATH`` (NAME: resnet, abn or proposed), as on the command line."""
    name, sep, rest = spec.partition("=")
    if sep and name in ROLES:
        return name, Path(rest)
    if sep and "/" not in name and not Path(spec).exists():
        raise ValueError(f"--checkpoint {spec}: NAME must be one of {', '.join(ROLES)}")
    return None, Path(spec)


def candidate_from_checkpoint(
    spec: str | Path | tuple[str | None, str | Path], device: torch.device | str = "cpu"
) -> Candidate:
    """Load a checkpoint given as a path, ``NAME=PATH``, or ``(NAME, PATH)``."""
    if isinstance(spec, tuple):
        role, path = spec[0], Path(spec[1])
    elif isinstance(spec, Path):
        role, path = None, spec
    else:
        role, path = parse_checkpoint_spec(spec)
    model, meta = load_checkpoint(path, device=device)
    return Candidate(role or role_of(meta), model, meta, str(path))


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class MethodResult:
    """One method's numbers, its mean curves, and its maps for the example images."""

    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    fractions: np.ndarray | None = None  # (n + 1,) fraction of pixels perturbed
    deletion_curve: np.ndarray | None = None  # (n + 1,) mean over the test images
    insertion_curve: np.ndarray | None = None
    example_maps: np.ndarray | None = None  # (E, h, w) in [0, 1]
    map_samples: int = 0  # images the map MSE is averaged over
    correct: np.ndarray | None = None  # (N,) bool, top-1 right per test image (paired tests)


@dataclass
class Evaluation:
    """Everything `model.paper.report` renders; `metrics` is ``metrics.json`` (docs/results)."""

    dataset: str
    arch: str
    image_size: int
    classes: list[str]
    num_samples: int
    num_maps: int
    step: int
    methods: dict[str, MethodResult]
    sources: dict[str, str]
    example_images: np.ndarray  # (E, H, W, 3) uint8
    example_labels: list[int]
    example_human: np.ndarray | None  # (E, h, w), NaN where an image has no map
    notes: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)  # the test images, in evaluation order

    @property
    def metrics(self) -> dict[str, Any]:
        """The ``metrics.json`` dictionary: methods in the paper's order, absent when not run."""
        methods = {
            name: {k: float(self.methods[name].metrics[k]) for k in METRIC_KEYS if k in m.metrics}
            for name in METHODS
            if (m := self.methods.get(name)) is not None
        }
        return {
            "dataset": self.dataset,
            "arch": self.arch,
            "image_size": self.image_size,
            "methods": methods,
        }


# --------------------------------------------------------------------------------------------
# The test split
# --------------------------------------------------------------------------------------------


def _name_files(paths: Sequence[Path], limit: int = 20) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def spread(n: int, count: int | None) -> list[int]:
    """``count`` indices spread evenly over ``range(n)`` (all of them when count is None)."""
    if count is None or count >= n:
        return list(range(n))
    if count < 1:
        raise ValueError(f"a sample limit must be >= 1, got {count}")
    return [int(i) for i in np.unique(np.linspace(0, n - 1, count).round().astype(int))]


def load_test_samples(
    data_dir: str | Path, classes: list[str], limit: int | None = None
) -> list[Sample]:
    """The test split's samples, checked up front: split present, known classes, files decode.

    ``limit`` keeps that many samples spread evenly over the (class-sorted) list, so a quick run
    still sees every class.
    """
    samples = list_samples(data_dir, "test", classes)
    samples = [samples[i] for i in spread(len(samples), limit)]
    bad = unreadable_files(s.image for s in samples)
    if bad:
        raise DatasetError(f"{len(bad)} test image(s) cannot be decoded: {_name_files(bad)}")
    bad_maps = unreadable_files(s.map for s in samples if s.map is not None)
    if bad_maps:
        raise DatasetError(
            f"{len(bad_maps)} human map(s) cannot be decoded: {_name_files(bad_maps)}"
        )
    with_maps = sum(s.map is not None for s in samples)
    maps_dir = Path(data_dir) / "maps" / "test"
    if with_maps == 0:
        log.warning("no human maps under %s: map MSE will not be reported", maps_dir)
    elif with_maps < len(samples):
        missing = [s.image for s in samples if s.map is None]
        log.warning(
            "%d of %d test images have no human map under %s (e.g. %s): map MSE is averaged over "
            "the %d that do",
            len(missing),
            len(samples),
            maps_dir,
            _name_files(missing, 3),
            with_maps,
        )
    return samples


def _check_compatible(candidates: Sequence[Candidate]) -> None:
    """One table compares like with like: same classes, architecture and input size."""
    if not candidates:
        raise ValueError("nothing to evaluate: give at least one checkpoint")
    roles = [c.role for c in candidates]
    duplicates = sorted({r for r in roles if roles.count(r) > 1})
    if duplicates:
        raise ValueError(
            f"more than one checkpoint plays {duplicates}: label them NAME=PATH "
            f"(NAME in {', '.join(ROLES)}), one per role"
        )
    first = candidates[0]
    for other in candidates[1:]:
        for key in ("classes", "arch", "image_size"):
            if other.meta[key] != first.meta[key]:
                raise ValueError(
                    f"{other.source or other.role}: {key} {other.meta[key]!r} differs from "
                    f"{first.source or first.role}'s {first.meta[key]!r}; evaluate them separately"
                )


# --------------------------------------------------------------------------------------------
# The measures
# --------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else TrainConfig(device=device).torch_device()


def _abn_logits(model: ABN):
    return lambda x: model(x).perception_logits


def _example_indices(samples: Sequence[Sample], count: int) -> list[int]:
    """The first image of each class, in class order, up to ``count`` (then the next ones)."""
    chosen: list[int] = []
    seen: set[int] = set()
    for i, s in enumerate(samples):
        if s.label not in seen:
            chosen.append(i)
            seen.add(s.label)
    rest = [i for i in range(len(samples)) if i not in set(chosen)]
    return sorted((chosen + rest)[:count], key=lambda i: (samples[i].label, i))


class _Accumulator:
    """Running sums of one map method's curves and errors over the batches."""

    def __init__(self, name: str, examples: dict[int, int], curve_rows: set[int]) -> None:
        self.result = MethodResult(name)
        self.examples = examples
        self.curve_rows = curve_rows
        self.del_sum = self.ins_sum = 0.0
        self.del_curve: Tensor | None = None
        self.ins_curve: Tensor | None = None
        self.count = 0
        self.mse_sum = 0.0
        self.mse_count = 0
        self.example_maps: dict[int, np.ndarray] = {}

    def add(
        self,
        scorer: DeletionInsertion,
        images: Tensor,
        maps: Tensor,
        human: Tensor,
        has_map: Tensor,
        offset: int,
    ) -> None:
        maps = maps.detach().float()
        if maps.ndim == 4:
            maps = maps[:, 0]
        rows = [r for r in range(len(images)) if offset + r in self.curve_rows]
        if rows:
            self._add_curves(scorer(images[rows], maps[rows]))
        if bool(has_map.any()):
            errors = map_mse(maps[has_map].cpu().clamp(0.0, 1.0), human[has_map].cpu())
            self.mse_sum += float(errors.sum())
            self.mse_count += int(has_map.sum())
        cpu_maps = maps.cpu().numpy()
        for row in range(len(images)):
            slot = self.examples.get(offset + row)
            if slot is not None:
                self.example_maps[slot] = cpu_maps[row]

    def _add_curves(self, curves: CurveResult) -> None:
        if self.del_curve is None or self.ins_curve is None:
            self.del_curve = curves.deletion_curve.sum(0)
            self.ins_curve = curves.insertion_curve.sum(0)
            self.result.fractions = curves.fractions.numpy()
        else:
            self.del_curve += curves.deletion_curve.sum(0)
            self.ins_curve += curves.insertion_curve.sum(0)
        self.del_sum += float(curves.deletion_auc.sum())
        self.ins_sum += float(curves.insertion_auc.sum())
        self.count += len(curves.classes)

    def finish(self) -> MethodResult:
        r = self.result
        if self.count and self.del_curve is not None and self.ins_curve is not None:
            r.metrics["deletion"] = self.del_sum / self.count
            r.metrics["insertion"] = self.ins_sum / self.count
            r.deletion_curve = (self.del_curve / self.count).numpy()
            r.insertion_curve = (self.ins_curve / self.count).numpy()
        if self.mse_count:
            r.metrics["map_mse"] = self.mse_sum / self.mse_count
            r.map_samples = self.mse_count
        if self.example_maps:
            r.example_maps = np.stack([self.example_maps[k] for k in sorted(self.example_maps)])
        return r


def _evaluate_candidate(
    candidate: Candidate,
    dataset: AttentionDataset,
    batch_size: int,
    device: torch.device,
    step: int | None,
    examples: dict[int, int],
    curve_rows: set[int],
) -> list[MethodResult]:
    """All methods one model yields, in one pass over the test split."""
    model = candidate.model.to(device).eval()
    is_abn = candidate.meta["kind"] == "abn"
    classify = _abn_logits(model) if is_abn else model
    scorer = DeletionInsertion(classify, step=step, batch_size=batch_size, disable_progress=True)
    accumulators = [
        _Accumulator(name, examples, curve_rows) for name in MAP_METHODS[candidate.role]
    ]
    all_logits, all_labels = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    offset = 0
    bar = tqdm(loader, desc=f"evaluate {candidate.role}", unit="batch", leave=False, disable=None)
    for images, labels, human, has_map in bar:
        images = images.to(device)
        with torch.no_grad():
            output = model(images)
        logits = output.perception_logits if is_abn else output
        all_logits.append(logits.float().cpu())
        all_labels.append(labels)
        if is_abn:
            batch_maps = [output.attention]
        else:
            batch_maps = [cam_maps(model, images), gradcam_maps(model, images)]
        for acc, maps in zip(accumulators, batch_maps, strict=True):
            acc.add(scorer, images, maps, human, has_map.bool(), offset)
        offset += len(images)
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    top = topk_accuracy(logits, labels, ks=(1, 5))
    accuracy = {"top1": top[1], "top5": top[5]}
    correct = (logits.argmax(dim=1) == labels).numpy()
    results = [acc.finish() for acc in accumulators]
    if is_abn:
        results[0].metrics = {**accuracy, **results[0].metrics}
        results[0].correct = correct
    else:
        results.insert(0, MethodResult("resnet", metrics=accuracy, correct=correct))
    for r in results:
        log.info(
            "%s (%s): %s",
            r.name,
            candidate.source or candidate.role,
            ", ".join(f"{k} {v:.4f}" for k, v in r.metrics.items()),
        )
    return results


def _display_images(
    dataset: AttentionDataset, indices: Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """Example images back in displayable uint8 RGB, as the model saw them (resized)."""
    out = []
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    for i in indices:
        image = dataset[i][0] * s + m
        out.append((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
    return np.stack(out) if out else np.zeros((0, 1, 1, 3), dtype=np.uint8)


def run_evaluation(
    candidates: Sequence[Candidate],
    data_dir: str | Path,
    batch_size: int = 32,
    device: str | torch.device = "auto",
    limit: int | None = None,
    step: int | None = None,
    num_examples: int = 6,
    dataset_name: str | None = None,
    curve_limit: int | None = None,
) -> Evaluation:
    """Evaluate in-memory models on ``data_dir``'s test split; nothing is written.

    ``limit`` evaluates only that many test images; ``curve_limit`` keeps accuracy and map MSE on
    all of them but scores deletion/insertion (the costly part, 2n forwards per image) on that
    many, spread over the classes.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    _check_compatible(candidates)
    order = {role: i for i, role in enumerate(ROLES)}
    candidates = sorted(candidates, key=lambda c: order[c.role])
    first = candidates[0].meta
    classes, image_size = list(first["classes"]), int(first["image_size"])
    torch_device = resolve_device(device)
    samples = load_test_samples(data_dir, classes, limit)
    example_idx = _example_indices(samples, num_examples)
    examples = {idx: slot for slot, idx in enumerate(example_idx)}
    curve_rows = set(spread(len(samples), curve_limit))
    log.info(
        "evaluating %s on %d test images of %s (%s)",
        ", ".join(c.role for c in candidates),
        len(samples),
        data_dir,
        torch_device,
    )
    methods: dict[str, MethodResult] = {}
    datasets: dict[tuple, AttentionDataset] = {}
    for candidate in candidates:
        key = (tuple(candidate.meta.mean), tuple(candidate.meta.std))
        if key not in datasets:
            ds = AttentionDataset(data_dir, "test", classes, image_size, *map(list, key))
            ds.samples = samples
            datasets[key] = ds
        for result in _evaluate_candidate(
            candidate, datasets[key], batch_size, torch_device, step, examples, curve_rows
        ):
            methods[result.name] = result
    dataset = next(iter(datasets.values()))
    human = None
    if any(samples[i].map is not None for i in example_idx):
        human = np.stack([_human_or_nan(dataset, samples, i) for i in example_idx])
    num_maps = sum(s.map is not None for s in samples)
    notes = []
    if len(curve_rows) < len(samples):
        notes.append(
            f"Deletion and insertion are scored on {len(curve_rows)} of the {len(samples)} test "
            "images (spread over the classes); accuracy and map MSE on all."
        )
    if num_maps == 0:
        notes.append(
            f"No human maps under {Path(data_dir) / 'maps' / 'test'}: map MSE not computed."
        )
    elif num_maps < len(samples):
        notes.append(
            f"Map MSE is averaged over the {num_maps} of {len(samples)} images with a map."
        )
    return Evaluation(
        dataset=dataset_name or Path(data_dir).resolve().name,
        arch=str(first["arch"]),
        image_size=image_size,
        classes=classes,
        num_samples=len(samples),
        num_maps=num_maps,
        step=step or image_size,
        methods=methods,
        sources={c.role: c.source for c in candidates},
        example_images=_display_images(dataset, example_idx, first["mean"], first["std"]),
        example_labels=[samples[i].label for i in example_idx],
        example_human=human,
        notes=notes,
        samples=samples,
    )


def _human_or_nan(dataset: AttentionDataset, samples: Sequence[Sample], index: int) -> np.ndarray:
    side = dataset.map_size
    if samples[index].map is None:
        return np.full((side, side), np.nan, dtype=np.float32)
    return dataset[index][2][0].numpy()


def evaluate_checkpoints(
    checkpoints: Sequence[str | Path | tuple[str | None, str | Path] | Candidate],
    data_dir: str | Path,
    batch_size: int = 32,
    device: str | torch.device = "auto",
    limit: int | None = None,
    step: int | None = None,
    curve_limit: int | None = None,
) -> dict[str, Any]:
    """The ``metrics.json`` dictionary for checkpoints (paths, ``NAME=PATH``, or Candidates)."""
    torch_device = resolve_device(device)
    candidates = [
        c if isinstance(c, Candidate) else candidate_from_checkpoint(c, torch_device)
        for c in checkpoints
    ]
    evaluation = run_evaluation(
        candidates, data_dir, batch_size, torch_device, limit, step, curve_limit=curve_limit
    )
    return evaluation.metrics


def paired_top1(a: MethodResult, b: MethodResult) -> tuple[int, int, float] | None:
    """Images only ``a`` gets right, only ``b`` gets right, and the exact McNemar p-value.

    Both must have been evaluated on the same test images; accuracy differences of a few points
    on a few hundred images need this before they mean anything.
    """
    if a.correct is None or b.correct is None or len(a.correct) != len(b.correct):
        return None
    from scipy.stats import binomtest

    only_a = int((a.correct & ~b.correct).sum())
    only_b = int((~a.correct & b.correct).sum())
    p = binomtest(only_b, only_a + only_b).pvalue if only_a + only_b else 1.0
    return only_a, only_b, float(p)


def curve_points(image_size: int, step: int | None) -> int:
    """Points on each deletion/insertion curve, for the report."""
    return math.ceil(image_size * image_size / (step or image_size)) + 1
