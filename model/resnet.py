"""ResNet building blocks shared by the plain baseline and the ABN.

The blocks are torchvision's own, so that torchvision's ImageNet weights load by name. The
squeeze-and-excitation variants add the channel gate of Hu et al. (SENet), which the paper's
Table 2 combines with ABN.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from model.pretrained import load_pretrained

Block = type[tv_resnet.BasicBlock] | type[tv_resnet.Bottleneck]


class SqueezeExcitation(nn.Module):
    """Channel gate: global pooling, a bottleneck MLP, a sigmoid scale per channel."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.fc2(self.relu(self.fc1(self.pool(x)))))
        return x * scale


class SEBasicBlock(tv_resnet.BasicBlock):
    """BasicBlock whose residual branch is gated by squeeze-and-excitation before the sum."""

    def __init__(self, inplanes: int, planes: int, *args, **kwargs) -> None:
        super().__init__(inplanes, planes, *args, **kwargs)
        self.se = SqueezeExcitation(planes * self.expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu(out + identity)


class SEBottleneck(tv_resnet.Bottleneck):
    """Bottleneck whose residual branch is gated by squeeze-and-excitation before the sum."""

    def __init__(self, inplanes: int, planes: int, *args, **kwargs) -> None:
        super().__init__(inplanes, planes, *args, **kwargs)
        self.se = SqueezeExcitation(planes * self.expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


# Block type and blocks per stage, as in torchvision and the ABN paper.
ARCHITECTURES: dict[str, tuple[Block, list[int]]] = {
    "resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (tv_resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3]),
    "resnet101": (tv_resnet.Bottleneck, [3, 4, 23, 3]),
    "resnet152": (tv_resnet.Bottleneck, [3, 8, 36, 3]),
}


def block_for(arch: str, se: bool = False) -> tuple[Block, list[int]]:
    """The block class and stage depths of `arch`, with the SE gate when asked."""
    if arch not in ARCHITECTURES:
        known = ", ".join(ARCHITECTURES)
        raise ValueError(f"unknown architecture {arch!r}; choose one of {known}")
    block, layers = ARCHITECTURES[arch]
    if se:
        block = SEBasicBlock if block is tv_resnet.BasicBlock else SEBottleneck
    return block, layers


def make_layer(block: Block, inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """One ResNet stage; a projection shortcut where the shape changes, as torchvision does."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def init_weights(module: nn.Module) -> None:
    """He initialisation for convolutions, unit BatchNorm: torchvision's defaults."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_resnet(
    arch: str, num_classes: int, pretrained: str | None = None, se: bool = False
) -> tv_resnet.ResNet:
    """The plain ResNet baseline (for CAM and Grad-CAM), trained the same way as the ABN."""
    block, layers = block_for(arch, se)
    net = tv_resnet.ResNet(block, layers, num_classes=num_classes)
    if pretrained:
        load_pretrained(net, arch, pretrained)
    return net
