"""model.paper.saliency: CAM and Grad-CAM against hand computations, and no leftover hooks."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from model.metrics import normalize_map
from model.paper.saliency import cam_maps, gradcam_maps


def tiny_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=3).eval()


def images(n: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """layer4's output (still in the graph) and the logits, via a hook removed right after."""
    store: list[torch.Tensor] = []
    handle = model.layer4.register_forward_hook(lambda _m, _i, out: store.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return store[0], logits


def assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name
        assert not module._backward_hooks, name


def test_cam_matches_hand_computation():
    model, x = tiny_resnet(), images()
    with torch.no_grad():
        feats, logits = features_and_logits(model, x)
        pred = logits.argmax(dim=1)
        want = (model.fc.weight[pred][:, :, None, None] * feats).sum(dim=1)
    raw = cam_maps(model, x, normalize=False)
    assert raw.shape == (2, 2, 2)  # 64 / 32
    torch.testing.assert_close(raw, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cam_maps(model, x), normalize_map(want), atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        want_c2 = (model.fc.weight[2][None, :, None, None] * feats).sum(dim=1)
    torch.testing.assert_close(
        cam_maps(model, x, targets=[2, 2], normalize=False), want_c2, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        cam_maps(model, x, targets=2, normalize=False), want_c2, atol=1e-5, rtol=1e-5
    )
    assert_no_hooks(model)


def test_gradcam_matches_hand_computation_and_relu_cam():
    model, x = tiny_resnet(), images(size=128)
    targets = torch.tensor([0, 2])
    feats, logits = features_and_logits(model, x)
    grads = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), feats)[0]
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    want = normalize_map((alpha * feats).sum(dim=1).relu().detach())

    got = gradcam_maps(model, x, targets=targets)
    assert got.shape == (2, 4, 4)  # layer4's grid, not upsampled
    assert got.dtype == torch.float32
    assert got.min().item() >= 0.0 and got.max().item() <= 1.0
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # GAP + linear head: Grad-CAM on layer4 is ReLU(CAM) up to scale.
    relu_cam = normalize_map(cam_maps(model, x, targets=targets, normalize=False).relu())
    torch.testing.assert_close(got, relu_cam, atol=1e-4, rtol=0)
    # Default target is the predicted class.
    pred = logits.argmax(dim=1)
    torch.testing.assert_close(gradcam_maps(model, x), gradcam_maps(model, x, targets=pred))
    assert_no_hooks(model)


class RegionModel(nn.Module):
    """ResNet-shaped toy: layer4 is the pooled image brightness, class 0 likes it, class 1 not."""

    def __init__(self) -> None:
        super().__init__()
        self.layer4 = nn.Sequential(nn.AvgPool2d(4), nn.Conv2d(3, 1, 1, bias=False), nn.ReLU())
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.layer4[1].weight.fill_(1.0)
            self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer4(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("method", [cam_maps, gradcam_maps])
def test_maps_highlight_the_region_the_model_uses(method):
    model = RegionModel().eval()
    x = torch.zeros(1, 3, 32, 32)
    x[:, :, 4:12, 20:28] = 1.0  # feature cells rows 1-2, cols 5-6
    maps = method(model, x)
    assert maps.shape == (1, 8, 8)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[1:3, 5:7] = True
    torch.testing.assert_close(maps[0][inside], torch.ones(4))
    torch.testing.assert_close(maps[0][~inside], torch.zeros(60))


def test_state_restored_and_hooks_removed():
    model, x = tiny_resnet(), images()
    model.train()
    model.layer2.eval()  # mixed modes must come back as they were
    marker = torch.full_like(model.fc.weight, 7.0)
    model.fc.weight.grad = marker
    cam_maps(model, x)
    gradcam_maps(model, x)
    assert model.training and model.layer1.training and not model.layer2.training
    assert not any(m.training for m in model.layer2.modules())
    assert model.fc.weight.grad is marker
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.weight")
    assert_no_hooks(model)


def test_hooks_removed_on_errors():
    model = tiny_resnet()
    with pytest.raises(ValueError):
        cam_maps(model, images(), targets=[5, 0])
    with pytest.raises(ValueError):
        gradcam_maps(model, images(), targets=[5, 0])
    with pytest.raises(RuntimeError):  # fails inside the hooked forward
        gradcam_maps(model, torch.randn(1, 4, 64, 64))
    with pytest.raises(RuntimeError):
        cam_maps(model, torch.randn(1, 4, 64, 64))
    assert_no_hooks(model)


def test_gradcam_works_for_frozen_model_and_under_no_grad():
    model, x = tiny_resnet(), images()
    want = gradcam_maps(model, x)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.inference_mode():
        got = gradcam_maps(model, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert_no_hooks(model)
