"""Evaluation measures of the paper (section 5): top-k accuracy, RISE deletion/insertion, map MSE.

Everything here is model-agnostic: the deletion/insertion metric only needs a ``classify``
callable mapping a normalised image batch ``(B, 3, H, W)`` to logits ``(B, K)``, so the same code
scores CAM and Grad-CAM on a plain ResNet, ABN's attention map, and the fine-tuned ABN.

Deletion and insertion follow RISE (Petsiuk et al., 2018; reference code eclique/RISE,
``evaluation.py``):

* the score is the softmax probability of the class predicted on the clean image;
* pixels are ranked by the saliency map upsampled (bilinear) to image size, highest first, with a
  stable sort so ties break in raster order and results are deterministic;
* deletion starts from the image and sets the ranked pixels (all channels) to zero in normalised
  space; insertion starts from a blurred copy and restores the ranked pixels from the image;
* ``step`` pixels change per step (default: the image width), giving ``n + 1`` points with
  ``n = ceil(H * W / step)``, the first at 0% perturbed and the last at 100%;
* the AUC is the trapezoid rule over equally spaced points, normalised by ``n`` to [0, 1].
  When ``step`` does not divide ``H * W`` the last step is shorter but still counts as a full
  interval (RISE's ``auc``); ``torchcam.metrics.DeletionInsertionMetric`` integrates over the
  true fractions instead, so the two agree exactly only when ``step`` divides ``H * W`` (the
  default ``step = W`` always does).

RISE's blur is a Gaussian kernel obtained by applying ``scipy.ndimage.gaussian_filter`` (sigma 5)
to an 11x11 delta, convolved per channel with zero padding 5.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import Tensor, nn

log = logging.getLogger(__name__)

Classifier = Callable[[Tensor], Tensor]

RISE_BLUR_SIZE = 11
RISE_BLUR_SIGMA = 5.0

__all__ = [
    "Classifier",
    "CurveResult",
    "DeletionInsertion",
    "auc",
    "map_mse",
    "normalize_map",
    "rise_blur",
    "rise_blur_kernel",
    "topk_accuracy",
]


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------


def topk_accuracy(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of samples whose target is among the ``k`` highest logits, for each ``k``.

    ``k`` larger than the number of classes is clamped to it (so top-5 on 3 classes is 1.0): the
    paper reports top-5 alongside top-1 and small test problems have fewer than 5 classes.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, K), got {tuple(logits.shape)}")
    targets = targets.reshape(-1).to(logits.device)
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits rows but {targets.shape[0]} targets")
    if logits.shape[0] == 0:
        raise ValueError("cannot compute accuracy of an empty batch")
    if any(k < 1 for k in ks):
        raise ValueError(f"k must be >= 1, got {tuple(ks)}")
    num_classes = logits.shape[1]
    kmax = min(max(ks), num_classes)
    top = logits.topk(kmax, dim=1).indices  # (B, kmax), sorted highest first
    hits = top == targets.unsqueeze(1)
    return {k: hits[:, : min(k, num_classes)].any(dim=1).float().mean().item() for k in ks}


# --------------------------------------------------------------------------------------------
# RISE blur
# --------------------------------------------------------------------------------------------


def rise_blur_kernel(size: int = RISE_BLUR_SIZE, sigma: float = RISE_BLUR_SIGMA) -> Tensor:
    """The 2D kernel RISE uses for insertion's starting image.

    It is ``scipy.ndimage.gaussian_filter`` (default ``reflect`` mode, truncate 4) applied to a
    centred delta, which is not the same as a sampled Gaussian: the reflection folds the tails
    back, so it is built the same way here to match RISE's numbers.
    """
    delta = np.zeros((size, size), dtype=np.float64)
    delta[size // 2, size // 2] = 1.0
    return torch.from_numpy(gaussian_filter(delta, sigma)).float()


def rise_blur(images: Tensor, size: int = RISE_BLUR_SIZE, sigma: float = RISE_BLUR_SIGMA) -> Tensor:
    """Blur each channel of ``images`` (B, C, H, W) with RISE's kernel and zero padding."""
    channels = images.shape[1]
    kernel = rise_blur_kernel(size, sigma).to(device=images.device, dtype=images.dtype)
    weight = kernel.expand(channels, 1, size, size)
    return F.conv2d(images, weight, padding=size // 2, groups=channels)


# --------------------------------------------------------------------------------------------
# Deletion / insertion
# --------------------------------------------------------------------------------------------


def auc(curve: Tensor) -> Tensor:
    """Area under equally spaced curve points on [0, 1] by the trapezoid rule (RISE's ``auc``).

    Works on the last dimension: ``(..., n + 1) -> (...)``.
    """
    if curve.shape[-1] < 2:
        raise ValueError("a curve needs at least two points")
    n = curve.shape[-1] - 1
    return (curve.sum(dim=-1) - 0.5 * (curve[..., 0] + curve[..., -1])) / n


@dataclass(frozen=True)
class CurveResult:
    """Per-image deletion and insertion curves and their areas.

    ``fractions[i]`` is the fraction of pixels perturbed at point ``i`` (1.0 at the last point);
    ``classes`` is the class whose probability was tracked. All tensors are on the CPU.
    """

    deletion_curve: Tensor  # (B, n + 1)
    insertion_curve: Tensor  # (B, n + 1)
    deletion_auc: Tensor  # (B,)
    insertion_auc: Tensor  # (B,)
    classes: Tensor  # (B,)
    fractions: Tensor  # (n + 1,)


def _as_maps(saliency: Tensor, batch: int) -> Tensor:
    """Bring a (B, h, w) or (B, 1, h, w) map to (B, h, w) float."""
    if saliency.ndim == 4 and saliency.shape[1] == 1:
        saliency = saliency[:, 0]
    if saliency.ndim != 3:
        raise ValueError(f"maps must be (B, h, w) or (B, 1, h, w), got {tuple(saliency.shape)}")
    if saliency.shape[0] != batch:
        raise ValueError(f"{saliency.shape[0]} maps for {batch} images")
    return saliency.float()


class DeletionInsertion:
    """RISE deletion and insertion curves for a batch of images and saliency maps.

    Perturbed images of many images and many steps are packed into one forward of up to
    ``batch_size`` images, so the cost is about ``2 * n * B / batch_size`` forwards. The model
    behind ``classify`` should be in eval mode (BatchNorm statistics would otherwise depend on the
    packing); a warning is logged when ``classify`` is an ``nn.Module`` in training mode.
    """

    def __init__(
        self,
        classify: Classifier,
        step: int | None = None,
        batch_size: int = 64,
        disable_progress: bool | None = None,
    ) -> None:
        """Args:
        classify: normalised images (B, 3, H, W) -> logits (B, K).
        step: pixels perturbed per step; ``None`` uses the image width, as RISE does.
        batch_size: perturbed images per forward.
        disable_progress: passed to tqdm's ``disable`` (``None``: show only on a terminal).
        """
        if step is not None and step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.classify = classify
        self.step = step
        self.batch_size = batch_size
        self.disable_progress = disable_progress

    def _probs(self, images: Tensor) -> Tensor:
        logits = self.classify(images)
        return logits.float().softmax(dim=1)

    @torch.inference_mode()
    def __call__(
        self, images: Tensor, saliency: Tensor, targets: Tensor | None = None
    ) -> CurveResult:
        """Score ``saliency`` (B, h, w) or (B, 1, h, w), any resolution, on ``images`` (B, C, H, W).

        ``targets`` overrides the tracked class; by default it is the prediction on the clean
        image, as in RISE and the paper.
        """
        if images.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
        if isinstance(self.classify, nn.Module) and self.classify.training:
            log.warning("classify is in training mode; deletion/insertion expects eval mode")
        batch, channels, height, width = images.shape
        device = images.device
        maps = _as_maps(saliency, batch).to(device)
        if not torch.isfinite(maps).all():
            raise ValueError("saliency maps contain NaN or inf")
        if maps.shape[-2:] != (height, width):
            maps = F.interpolate(
                maps.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False
            ).squeeze(1)

        num_pixels = height * width
        step = self.step or width
        n_steps = math.ceil(num_pixels / step)
        counts = torch.arange(n_steps + 1, device=device).mul(step).clamp_(max=num_pixels)
        fractions = counts.float().cpu() / num_pixels

        # rank[b, p] = position of pixel p in the highest-first order; pixel p is perturbed at
        # point i exactly when rank < counts[i].
        order = torch.argsort(maps.flatten(1), dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(num_pixels, device=device).expand(batch, -1))

        start = time.perf_counter()
        clean_probs = torch.cat(
            [self._probs(images[i : i + self.batch_size]) for i in range(0, batch, self.batch_size)]
        )
        if targets is None:
            classes = clean_probs.argmax(dim=1)
        else:
            classes = targets.reshape(-1).to(device=device, dtype=torch.long)
            if classes.shape[0] != batch:
                raise ValueError(f"{classes.shape[0]} targets for {batch} images")
        clean_score = clean_probs.gather(1, classes.unsqueeze(1)).squeeze(1)

        flat = images.flatten(2)  # (B, C, N)
        blurred = rise_blur(images).flatten(2)

        # curves[0] is deletion, curves[1] insertion. Their untouched ends are the clean image.
        curves = torch.empty(2, batch, n_steps + 1, device=device)
        curves[0, :, 0] = clean_score
        curves[1, :, n_steps] = clean_score
        # Remaining jobs: deletion points 1..n, insertion points 0..n-1, for every image.
        samples, curve_ids, points = torch.meshgrid(
            torch.arange(batch, device=device),
            torch.arange(2, device=device),
            torch.arange(n_steps, device=device),
            indexing="ij",
        )
        points = points + (curve_ids == 0).long()
        samples, curve_ids, points = samples.flatten(), curve_ids.flatten(), points.flatten()
        n_jobs = samples.numel()

        chunks = range(0, n_jobs, self.batch_size)
        if self.disable_progress is not True:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="deletion/insertion", disable=self.disable_progress)
        for lo in chunks:
            s = samples[lo : lo + self.batch_size]
            c = curve_ids[lo : lo + self.batch_size]
            p = points[lo : lo + self.batch_size]
            perturbed_mask = ranks[s] < counts[p].unsqueeze(1)  # (b, N)
            is_insertion = (c == 1).unsqueeze(1)
            keep_image = perturbed_mask == is_insertion  # deletion keeps the unperturbed pixels
            base = torch.where(
                is_insertion.unsqueeze(2), blurred[s], torch.zeros((), device=device)
            )
            batch_images = torch.where(keep_image.unsqueeze(1), flat[s], base)
            probs = self._probs(batch_images.view(-1, channels, height, width))
            curves[c, s, p] = probs.gather(1, classes[s].unsqueeze(1)).squeeze(1)

        elapsed = time.perf_counter() - start
        log.debug(
            "deletion/insertion: %d images, %d points, %d forwards of <=%d in %.2fs",
            batch,
            n_steps + 1,
            math.ceil(n_jobs / self.batch_size),
            self.batch_size,
            elapsed,
        )
        curves = curves.cpu()
        return CurveResult(
            deletion_curve=curves[0],
            insertion_curve=curves[1],
            deletion_auc=auc(curves[0]),
            insertion_auc=auc(curves[1]),
            classes=classes.cpu(),
            fractions=fractions,
        )


# --------------------------------------------------------------------------------------------
# Similarity to the human map
# --------------------------------------------------------------------------------------------


def normalize_map(maps: Tensor) -> Tensor:
    """Per-sample min-max scaling to [0, 1]; a constant map becomes all zeros.

    CAM is unbounded and Grad-CAM's scale depends on the logits, so both go through this before
    being compared with a human map in [0, 1].
    """
    flat = maps.float().flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - lo
    scaled = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), 0.0)
    return scaled.view(maps.shape)


def map_mse(pred_maps: Tensor, human_maps: Tensor) -> Tensor:
    """Per-sample mean squared error between a method's maps and human maps, shape (B,).

    Both are (B, h, w) or (B, 1, h, w) with values in [0, 1] (use :func:`normalize_map` for CAM
    and Grad-CAM). The method's map is resized to the human map's size with bilinear
    interpolation (``align_corners=False``, antialiased when shrinking): the human map is the
    reference, so its grid is the one the error is averaged over.
    """
    pred = _as_maps(pred_maps, pred_maps.shape[0])
    human = _as_maps(human_maps, pred.shape[0]).to(pred.device)
    for name, m in (("pred_maps", pred), ("human_maps", human)):
        if m.numel() and (m.min() < -1e-6 or m.max() > 1 + 1e-6):
            raise ValueError(f"{name} must lie in [0, 1]; normalise them first (normalize_map)")
    if pred.shape[-2:] != human.shape[-2:]:
        pred = F.interpolate(
            pred.unsqueeze(1),
            size=tuple(human.shape[-2:]),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        ).squeeze(1)
    return (pred - human).square().flatten(1).mean(dim=1)
