"""CAM and Grad-CAM maps for plain torchvision-style ResNets: the paper's baselines (section 5).

The model must expose ``layer4`` (last convolutional stage) and ``fc`` (the linear classifier
after global average pooling), and its forward must return logits, as torchvision's ResNets do.
Both functions return maps at ``layer4``'s resolution (input/32 for a torchvision ResNet, 7x7 for
224 input); callers resize them (``model.metrics`` upsamples for deletion/insertion and resizes to
the human map for MSE).

Choices, and why:

* **CAM** (Zhou et al., 2016) is computed directly: the ``fc`` weights of the class times the
  ``layer4`` feature maps, summed over channels, without the bias. ``pytorch_grad_cam`` 1.5.7 has
  no plain CAM class. Its ``GradCAM`` on ``layer4`` is *not* a substitute: for a GAP + linear head
  the gradient of the logit w.r.t. ``A_k(i, j)`` is ``w_ck / (h w)``, so Grad-CAM equals
  ``ReLU(CAM) / (h w)`` - the same up to scale only where CAM is positive; the ReLU clips the
  negative evidence that CAM keeps. CAM is returned min-max normalised per sample by default
  (``normalize=False`` gives the raw map).
* **Grad-CAM** goes through ``pytorch_grad_cam.GradCAM`` with the target resolution set to the
  target layer's own grid, so its map is not upsampled to the input; the package min-max
  normalises each map to [0, 1] after the ReLU.
* Both run the model in eval mode, and put back afterwards each module's training flag and each
  parameter's ``.grad`` (``pytorch_grad_cam`` switches the model to eval and zeroes gradients).
  Hooks are removed on exit, also when an error is raised. ``pytorch_grad_cam``'s own
  ``__exit__`` is not used because it swallows ``IndexError``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from model.metrics import normalize_map

log = logging.getLogger(__name__)

__all__ = ["cam_maps", "gradcam_maps"]

Targets = Tensor | Sequence[int] | None


@contextmanager
def _preserved_state(model: nn.Module) -> Iterator[None]:
    """Run in eval mode, then restore every module's mode and every parameter's gradient."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    try:
        model.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, grad in grads:
            p.grad = grad


@contextmanager
def _captured_output(module: nn.Module) -> Iterator[list[Tensor]]:
    """Record ``module``'s forward outputs in the yielded list; the hook lives only inside."""
    outputs: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _inp, out: outputs.append(out))
    try:
        yield outputs
    finally:
        handle.remove()


def _resolve_targets(targets: Targets, logits: Tensor) -> Tensor:
    """Class per sample: the prediction when ``targets`` is None, else the given classes."""
    if targets is None:
        return logits.argmax(dim=1)
    return _check_targets(targets, logits.shape[0], logits.shape[1]).to(logits.device)


def _check_targets(targets: Tensor | Sequence[int], batch: int, num_classes: int) -> Tensor:
    """Given classes as a (B,) long tensor, validated: an out-of-range class fails loudly here."""
    classes = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    if classes.numel() == 1 and batch > 1:
        classes = classes.expand(batch)
    if classes.shape[0] != batch:
        raise ValueError(f"{classes.shape[0]} targets for {batch} images")
    if bool(((classes < 0) | (classes >= num_classes)).any()):
        raise ValueError(f"targets must lie in [0, {num_classes}), got {classes.tolist()}")
    return classes


def cam_maps(
    model: nn.Module, images: Tensor, targets: Targets = None, normalize: bool = True
) -> Tensor:
    """Class activation maps (B, h, w) at ``layer4``'s resolution.

    ``targets`` (one class per image, or one for all) defaults to the predicted class. With
    ``normalize`` each map is min-max scaled to [0, 1]; otherwise the raw ``sum_k w_ck A_k``.
    """
    with _preserved_state(model), torch.no_grad(), _captured_output(model.layer4) as feats:
        logits = model(images)
    if len(feats) != 1:
        raise RuntimeError(f"layer4 ran {len(feats)} times in one forward; expected once")
    features = feats[0]  # (B, C, h, w)
    classes = _resolve_targets(targets, logits)
    weights = model.fc.weight.detach()[classes].to(features.dtype)  # (B, C)
    cam = torch.einsum("bc,bchw->bhw", weights, features)
    return normalize_map(cam) if normalize else cam


class _GridGradCAM(GradCAM):
    """``GradCAM`` whose output stays on the target layer's grid instead of the input's.

    The package resizes each map to ``get_target_width_height``; returning the activation's own
    size makes that resize the identity.
    """

    def get_target_width_height(self, input_tensor: Tensor) -> tuple[int, int]:
        activation = self.activations_and_grads.activations[-1]
        return int(activation.shape[-1]), int(activation.shape[-2])


@contextmanager
def _grad_cam(model: nn.Module, layer: nn.Module) -> Iterator[_GridGradCAM]:
    """A ``GradCAM`` whose hooks exist only inside the ``with`` block."""
    cam = _GridGradCAM(model=model, target_layers=[layer])
    try:
        yield cam
    finally:
        cam.activations_and_grads.release()


def gradcam_maps(
    model: nn.Module,
    images: Tensor,
    targets: Targets = None,
    target_layer: nn.Module | None = None,
) -> Tensor:
    """Grad-CAM maps (B, h, w) in [0, 1] at ``target_layer``'s resolution (default ``layer4``).

    The gradient is that of the class logit (pre-softmax, as in Selvaraju et al.); ``targets``
    defaults to the predicted class. The input is made to require grad so the map also exists for
    a model whose parameters are frozen.
    """
    layer = model.layer4 if target_layer is None else target_layer
    device = next(model.parameters()).device
    with torch.inference_mode(False), torch.enable_grad(), _preserved_state(model):
        inputs = images.detach().clone().to(device).requires_grad_(True)
        classes = None
        if targets is not None:
            classes = _check_targets(targets, inputs.shape[0], model.fc.out_features)
        with _grad_cam(model, layer) as cam:
            outputs = None if classes is None else [ClassifierOutputTarget(int(c)) for c in classes]
            maps = cam(input_tensor=inputs, targets=outputs)
            cam.outputs = None  # drop the retained graph now rather than at garbage collection
    return torch.from_numpy(maps).to(images.device)
