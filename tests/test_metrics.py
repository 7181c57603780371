"""Tests of model.metrics: hand-computed deletion/insertion curves, agreement with torchcam."""

from __future__ import annotations

import contextlib
import math
from functools import partial

import numpy as np
import pytest
import torch
from scipy.ndimage import correlate, gaussian_filter
from torch import nn

from model.metrics import (
    DeletionInsertion,
    auc,
    map_mse,
    normalize_map,
    rise_blur,
    rise_blur_kernel,
    topk_accuracy,
)

# ---------------------------------------------------------------------------------------------
# A "model" that only looks at one square: logit 0 = scale * mean of the square, others 0.
# ---------------------------------------------------------------------------------------------

SIZE = 8
SQUARE = (slice(2, 4), slice(2, 4))  # 4 pixels, exactly cell (1, 1) of a 4x4 map
SCALE = 4.0
NUM_CLASSES = 3


class SquareModel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = x[:, :, SQUARE[0], SQUARE[1]].mean(dim=(1, 2, 3))
        logits = torch.zeros(x.shape[0], NUM_CLASSES, dtype=x.dtype, device=x.device)
        logits[:, 0] = SCALE * region
        return logits


def prob0(logit0: float) -> float:
    """Softmax probability of class 0 when the other two logits are 0."""
    return math.exp(logit0) / (math.exp(logit0) + NUM_CLASSES - 1)


def square_mask() -> torch.Tensor:
    mask = torch.zeros(SIZE, SIZE)
    mask[SQUARE] = 1.0
    return mask


def blurred_ones() -> np.ndarray:
    """RISE's blur of an all-ones channel, computed independently with scipy (zero padding)."""
    return correlate(np.ones((SIZE, SIZE)), rise_blur_kernel().double().numpy(), mode="constant")


@pytest.fixture
def square_setup() -> tuple[DeletionInsertion, torch.Tensor]:
    return DeletionInsertion(SquareModel(), step=2, batch_size=7), torch.ones(1, 3, SIZE, SIZE)


def test_square_model_good_vs_bad_map(square_setup: tuple[DeletionInsertion, torch.Tensor]):
    metric, image = square_setup
    good = square_mask()[None]
    bad = 1.0 - good
    rg, rb = metric(image, good), metric(image, bad)

    n = SIZE * SIZE // 2  # 32 steps of 2 pixels, 33 points
    assert rg.deletion_curve.shape == (1, n + 1)
    torch.testing.assert_close(rg.fractions, torch.arange(n + 1) / n)
    assert rg.classes.tolist() == [0]

    b = blurred_ones()
    sq = b[SQUARE]  # blurred square; ties in the map break in raster order
    p_full, p_half, p_none = prob0(SCALE), prob0(SCALE / 2), prob0(0.0)
    p_blur = prob0(SCALE * sq.mean())
    p_blur_half = prob0(SCALE * (2 + sq[1].sum()) / 4)  # first row of the square restored

    exp_del_good = [p_full, p_half] + [p_none] * (n - 1)
    exp_del_bad = [p_full] * (n - 1) + [p_half, p_none]
    exp_ins_good = [p_blur, p_blur_half] + [p_full] * (n - 1)
    exp_ins_bad = [p_blur] * (n - 1) + [p_blur_half, p_full]
    for got, want in [
        (rg.deletion_curve, exp_del_good),
        (rb.deletion_curve, exp_del_bad),
        (rg.insertion_curve, exp_ins_good),
        (rb.insertion_curve, exp_ins_bad),
    ]:
        torch.testing.assert_close(got[0], torch.tensor(want, dtype=torch.float32))

    # Good map: deletion falls at once (low AUC), insertion rises at once (high AUC).
    assert rg.deletion_auc.item() == pytest.approx((p_full / 2 + p_half + (n - 1.5) * p_none) / n)
    assert rg.deletion_auc.item() < 0.4 < 0.9 < rb.deletion_auc.item()
    assert rg.insertion_auc.item() > 0.9 > rb.insertion_auc.item()


def test_low_resolution_map_is_upsampled(square_setup: tuple[DeletionInsertion, torch.Tensor]):
    metric, image = square_setup
    low = torch.zeros(1, 1, 4, 4)
    low[0, 0, 1, 1] = 1.0  # bilinear upsampling makes the square the highest pixels
    full = metric(image, square_mask()[None])
    coarse = metric(image, low)
    torch.testing.assert_close(coarse.deletion_curve, full.deletion_curve)
    torch.testing.assert_close(coarse.insertion_curve, full.insertion_curve)


def test_default_step_is_image_width_and_uneven_step():
    model, image = SquareModel(), torch.ones(1, 3, SIZE, SIZE)
    r = DeletionInsertion(model)(image, square_mask()[None])
    assert r.deletion_curve.shape == (1, SIZE + 1)
    # The first step of 8 pixels takes the whole square (ranked first), then nothing changes.
    torch.testing.assert_close(
        r.deletion_curve[0], torch.tensor([prob0(SCALE)] + [prob0(0.0)] * SIZE)
    )
    r = DeletionInsertion(model, step=5)(image, square_mask()[None])
    assert r.deletion_curve.shape == (1, 14)  # ceil(64 / 5) = 13 steps
    assert r.fractions[-1].item() == 1.0
    assert r.fractions[-2].item() == pytest.approx(60 / 64)
    assert r.deletion_curve[0, -1].item() == pytest.approx(prob0(0.0))
    assert r.insertion_curve[0, -1].item() == pytest.approx(prob0(SCALE))


def test_targets_override_predicted_class():
    image = torch.ones(1, 3, SIZE, SIZE)
    r = DeletionInsertion(SquareModel(), step=16)(
        image, square_mask()[None], targets=torch.tensor([1])
    )
    assert r.classes.tolist() == [1]
    assert r.deletion_curve[0, 0].item() == pytest.approx((1 - prob0(SCALE)) / 2)


def test_auc_helper():
    assert auc(torch.tensor([1.0, 1.0, 1.0])).item() == pytest.approx(1.0)
    assert auc(torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)
    assert auc(torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0])).item() == pytest.approx(0.5)
    torch.testing.assert_close(
        auc(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])), torch.tensor([0.25, 0.75])
    )
    with pytest.raises(ValueError):
        auc(torch.tensor([1.0]))


def test_rise_blur_matches_scipy():
    kernel = rise_blur_kernel()
    assert kernel.shape == (11, 11)
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(kernel, kernel.flip(0).flip(1))
    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    np.testing.assert_allclose(kernel.numpy(), gaussian_filter(delta, 5), rtol=1e-6)

    images = torch.randn(2, 3, 13, 9, generator=torch.Generator().manual_seed(0))
    got = rise_blur(images)
    assert got.shape == images.shape
    k = kernel.double().numpy()
    want = np.stack(
        [
            np.stack([correlate(ch.double().numpy(), k, mode="constant") for ch in img])
            for img in images
        ]
    )
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Agreement with torchcam's independent implementation
# ---------------------------------------------------------------------------------------------


def small_cnn(seed: int = 0) -> nn.Module:
    """Random CNN whose linear head sees every position, so predictions vary across images."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d((6, 8)),
        nn.Flatten(),
        nn.Linear(4 * 6 * 8, 5),
    )
    with torch.no_grad():
        model[-1].weight.mul_(10.0)  # spread the logits so the curves are not flat
    return model.eval()


class FixedMaps:
    """Stands in for a torchcam CAM extractor and hands back given maps."""

    def __init__(self, model: nn.Module, maps: torch.Tensor) -> None:
        self.model = model
        self.maps = maps

    def __call__(self, class_idx=None, scores=None, normalized=True, *, targets=None, **kwargs):
        return [self.maps]

    def fuse_cams(self, cams: list[torch.Tensor]) -> torch.Tensor:
        return cams[0]

    def _hooks_off(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def torchcam_aucs(
    model: nn.Module, images: torch.Tensor, maps: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (deletion, insertion) AUCs from torchcam: one metric instance per baseline."""
    from torchcam.metrics import DeletionInsertionMetric

    softmax = partial(torch.softmax, dim=-1)
    deletion, insertion = [], []
    for i in range(images.shape[0]):
        extractor = FixedMaps(model, maps[i : i + 1])
        m_del = DeletionInsertionMetric(extractor, softmax, steps=steps, baseline=None)
        m_ins = DeletionInsertionMetric(extractor, softmax, steps=steps, baseline=rise_blur)
        m_del.update(images[i : i + 1])
        m_ins.update(images[i : i + 1])
        deletion.append(m_del.summary()["deletion_auc"])
        insertion.append(m_ins.summary()["insertion_auc"])
    return torch.tensor(deletion), torch.tensor(insertion)


@pytest.mark.parametrize("step", [None, 24])
def test_agrees_with_torchcam(step: int | None):
    model = small_cnn()
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 12, 16, generator=gen)
    maps = torch.rand(4, 3, 4, generator=gen)  # low resolution: exercises the upsampling too
    ours = DeletionInsertion(model, step=step, batch_size=16)(images, maps)
    n_steps = 12 * 16 // (step or 16)
    ref_del, ref_ins = torchcam_aucs(model, images, maps, steps=n_steps)
    torch.testing.assert_close(ours.deletion_auc, ref_del, atol=1e-3, rtol=0)
    torch.testing.assert_close(ours.insertion_auc, ref_ins, atol=1e-3, rtol=0)
    # Not a vacuous agreement: the areas differ across images and between the two curves.
    assert ours.deletion_auc.std() > 0.01
    assert (ours.insertion_auc - ours.deletion_auc).abs().max() > 0.05


def test_batching_and_map_layout_do_not_change_results():
    model = small_cnn()
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(3, 3, 10, 10, generator=gen)
    maps = torch.rand(3, 10, 10, generator=gen)
    a = DeletionInsertion(model, batch_size=1)(images, maps)
    b = DeletionInsertion(model, batch_size=50)(images, maps.unsqueeze(1))
    torch.testing.assert_close(a.deletion_curve, b.deletion_curve, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.insertion_curve, b.insertion_curve, atol=1e-5, rtol=0)
    # One image at a time gives the same as the batch.
    c = DeletionInsertion(model)(images[1:2], maps[1:2])
    torch.testing.assert_close(c.deletion_curve[0], a.deletion_curve[1], atol=1e-5, rtol=0)


def test_constant_map_is_deterministic():
    model = small_cnn()
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    flat = torch.zeros(2, 8, 8)
    raster = torch.linspace(1, 0, 64).view(1, 8, 8).expand(2, -1, -1)  # raster order, explicit
    a = DeletionInsertion(model)(images, flat)
    b = DeletionInsertion(model)(images, raster)
    torch.testing.assert_close(a.deletion_curve, b.deletion_curve)
    torch.testing.assert_close(a.insertion_curve, b.insertion_curve)


def test_bad_inputs_raise():
    metric = DeletionInsertion(small_cnn())
    images = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError):
        metric(images, torch.rand(3, 8, 8))
    with pytest.raises(ValueError):
        metric(images, torch.full((2, 8, 8), float("nan")))
    with pytest.raises(ValueError):
        DeletionInsertion(small_cnn(), step=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = small_cnn()
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(3, 3, 16, 16, generator=gen)
    maps = torch.rand(3, 4, 4, generator=gen)
    cpu = DeletionInsertion(model)(images, maps)
    gpu = DeletionInsertion(model.cuda())(images.cuda(), maps.cuda())
    torch.testing.assert_close(gpu.deletion_auc, cpu.deletion_auc, atol=1e-4, rtol=0)
    torch.testing.assert_close(gpu.insertion_auc, cpu.insertion_auc, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Accuracy and map similarity
# ---------------------------------------------------------------------------------------------


def test_topk_accuracy():
    logits = torch.tensor(
        [
            [0.9, 0.05, 0.03, 0.01, 0.005, 0.005],  # target 0: top-1
            [0.1, 0.5, 0.2, 0.1, 0.05, 0.05],  # target 2: second, top-5 only
            [0.5, 0.2, 0.1, 0.09, 0.08, 0.03],  # target 5: last, neither
            [0.0, 0.0, 0.0, 0.0, 1.0, 0.0],  # target 4: top-1
        ]
    )
    targets = torch.tensor([0, 2, 5, 4])
    assert topk_accuracy(logits, targets) == {1: 0.5, 5: 0.75}
    assert topk_accuracy(logits, targets, ks=(2, 6, 10)) == {2: 0.75, 6: 1.0, 10: 1.0}
    # Fewer classes than k: clamped, so top-5 of 3 classes is always right.
    assert topk_accuracy(torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1]), ks=(5,)) == {5: 1.0}
    with pytest.raises(ValueError):
        topk_accuracy(logits, targets[:3])


def test_map_mse_hand_cases():
    ones, zeros = torch.ones(2, 6, 6), torch.zeros(2, 6, 6)
    torch.testing.assert_close(map_mse(ones, zeros), torch.ones(2))
    torch.testing.assert_close(map_mse(ones, ones), torch.zeros(2))
    half = torch.zeros(1, 1, 6, 6)
    half[..., :3, :] = 1.0
    torch.testing.assert_close(map_mse(half, torch.zeros(1, 6, 6)), torch.tensor([0.5]))
    # Method's map resized to the human map's grid: a constant stays constant.
    torch.testing.assert_close(
        map_mse(torch.full((1, 2, 2), 0.5), torch.zeros(1, 14, 14)), torch.tensor([0.25])
    )
    torch.testing.assert_close(
        map_mse(torch.ones(1, 28, 28), torch.zeros(1, 7, 7)), torch.tensor([1.0])
    )
    with pytest.raises(ValueError):
        map_mse(torch.full((1, 4, 4), 2.0), torch.zeros(1, 4, 4))


def test_normalize_map():
    maps = torch.stack([torch.arange(16.0).view(4, 4) - 3.0, torch.full((4, 4), 7.0)])
    out = normalize_map(maps)
    assert out.shape == maps.shape
    assert out[0].min().item() == 0.0 and out[0].max().item() == 1.0
    torch.testing.assert_close(out[0], torch.arange(16.0).view(4, 4) / 15)
    torch.testing.assert_close(out[1], torch.zeros(4, 4))
    assert normalize_map(maps.unsqueeze(1)).shape == (2, 1, 4, 4)
