"""ImageNet weights for the trunk: torchvision's weights API, or a local file.

ABN shares every name with torchvision's ResNet except its attention branch (`att.*`), so
torchvision weights load by name; layer4's weights also seed `att.layer4` (same shapes, only the
first block's stride differs). The classifier is dropped when the class count differs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision
from torch import nn

from model.errors import UserError

log = logging.getLogger(__name__)

WEIGHTS_ENUMS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
    "resnet152": "ResNet152_Weights",
}


class PretrainedWeightsError(UserError, ValueError):
    """The weights asked for do not exist or do not fit the architecture."""


def pretrained_state_dict(arch: str, pretrained: str | Path) -> dict[str, torch.Tensor]:
    """Read a local state-dict file, or fetch torchvision's named weights (cached by torch.hub)."""
    path = Path(pretrained)
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise PretrainedWeightsError(f"{path}: not a readable state dict ({exc})") from exc
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise PretrainedWeightsError(f"{path}: expected a state dict, found {type(state)}")
        return state
    name = str(pretrained)
    if "/" in name or name.endswith((".pt", ".pth")):
        raise PretrainedWeightsError(f"pretrained weights file {name} does not exist")
    try:
        weights = torchvision.models.get_weight(f"{WEIGHTS_ENUMS[arch]}.{name}")
    except (KeyError, ValueError) as exc:
        raise PretrainedWeightsError(
            f"{name!r} is neither a file nor a torchvision weight of {arch} "
            f"(for example IMAGENET1K_V1)"
        ) from exc
    log.info("loading %s (downloaded once into torch.hub's cache)", weights)
    return weights.get_state_dict(progress=True)


def load_pretrained(net: nn.Module, arch: str, pretrained: str | Path) -> None:
    """Load the trunk and layer4 (and seed the attention branch's layer4) into `net`, in place."""
    source = pretrained_state_dict(arch, pretrained)
    target = net.state_dict()
    state = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    if hasattr(net, "att"):
        for key, value in source.items():
            seeded = "att." + key
            if (
                key.startswith("layer4.")
                and seeded in target
                and target[seeded].shape == value.shape
            ):
                state.setdefault(seeded, value)
    trunk = [k for k in target if k.startswith(("conv1.", "layer1.", "layer3."))]
    if not all(k in state for k in trunk):
        missing = sorted(k for k in trunk if k not in state)[:3]
        raise PretrainedWeightsError(
            f"{pretrained} does not hold {arch} weights (missing or mis-shaped: {missing} ...)"
        )
    skipped = sorted(k for k in source if k not in state)
    if skipped:
        log.info("pretrained weights not used (new head or other shape): %s", skipped)
    net.load_state_dict(state, strict=False)
