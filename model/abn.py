"""Attention Branch Network (Fukui et al., CVPR 2019) on a ResNet, as Mitsuhara et al. edit it.

The network forks after layer3 (the trunk, stride 16). The attention branch classifies from
class-wise response maps and condenses them into one map M(x) in (0, 1); the perception branch
sees the trunk's features scaled by that map, ``x * M + x``, and classifies again. Passing an
``attention`` argument replaces M(x) in the perception branch: that is how a human-edited map
changes the prediction at inference (paper section 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.pretrained import load_pretrained
from model.resnet import Block, block_for, init_weights, make_layer


@dataclass
class ABNOutput:
    """What one forward pass gives: both branches' logits and the map the perception branch used."""

    attention_logits: torch.Tensor
    perception_logits: torch.Tensor
    attention: torch.Tensor


class AttentionBranch(nn.Module):
    """Stride-1 layer4 copy, K class-wise response maps, their logits and the single-channel map."""

    def __init__(self, block: Block, inplanes: int, blocks: int, num_classes: int) -> None:
        super().__init__()
        channels = 512 * block.expansion
        self.layer4 = make_layer(block, inplanes, 512, blocks, stride=1)
        self.bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, num_classes, kernel_size=1, bias=False)
        self.bn_maps = nn.BatchNorm2d(num_classes)
        self.relu = nn.ReLU(inplace=True)
        self.classifier = nn.Conv2d(num_classes, num_classes, kernel_size=1, bias=False)
        self.map_conv = nn.Conv2d(num_classes, 1, kernel_size=3, padding=1, bias=False)
        self.map_bn = nn.BatchNorm2d(1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.relu(self.bn_maps(self.conv(self.bn(self.layer4(features)))))
        logits = torch.flatten(self.pool(self.classifier(maps)), 1)
        attention = torch.sigmoid(self.map_bn(self.map_conv(maps)))
        return logits, attention


class ABN(nn.Module):
    """ResNet + attention branch. Module names follow torchvision so its weights load by name."""

    def __init__(self, block: Block, layers: list[int], num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = make_layer(block, 64, 64, layers[0], stride=1)
        self.layer2 = make_layer(block, 64 * block.expansion, 128, layers[1], stride=2)
        self.layer3 = make_layer(block, 128 * block.expansion, 256, layers[2], stride=2)
        trunk_channels = 256 * block.expansion
        self.att = AttentionBranch(block, trunk_channels, layers[3], num_classes)
        self.layer4 = make_layer(block, trunk_channels, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_weights(self)

    def trunk(self) -> nn.Sequential:
        """The feature extractor that fine-tuning freezes (its BatchNorm statistics included)."""
        return nn.Sequential(
            self.conv1, self.bn1, self.relu, self.maxpool, self.layer1, self.layer2, self.layer3
        )

    def branches(self) -> list[nn.Module]:
        """The attention and perception branches: what fine-tuning trains."""
        return [self.att, self.layer4, self.fc]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk output, stride 16: the input of both branches, and what fine-tuning caches."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_features(
        self, features: torch.Tensor, attention: torch.Tensor | None = None
    ) -> ABNOutput:
        """Both branches on trunk features; `attention`, if given, replaces the branch's map."""
        attention_logits, own_map = self.att(features)
        used = own_map if attention is None else self._check_map(attention, own_map)
        x = self.layer4(features * used + features)
        perception_logits = self.fc(torch.flatten(self.avgpool(x), 1))
        return ABNOutput(attention_logits, perception_logits, used)

    def forward(self, x: torch.Tensor, attention: torch.Tensor | None = None) -> ABNOutput:
        return self.forward_features(self.features(x), attention)

    @staticmethod
    def _check_map(attention: torch.Tensor, own_map: torch.Tensor) -> torch.Tensor:
        if attention.dim() == 3:
            attention = attention.unsqueeze(1)
        if attention.shape[1:] != own_map.shape[1:] or attention.shape[0] not in (
            1,
            own_map.shape[0],
        ):
            raise ValueError(
                f"edited attention map has shape {tuple(attention.shape)}, "
                f"the model's map is {tuple(own_map.shape)}"
            )
        return attention.to(own_map.dtype)


def build_abn(arch: str, num_classes: int, pretrained: str | None = None, se: bool = False) -> ABN:
    """An ABN on ResNet `arch` (resnet18 to resnet152), optionally with SE blocks."""
    block, layers = block_for(arch, se)
    net = ABN(block, layers, num_classes)
    if pretrained:
        load_pretrained(net, arch, pretrained)
    return net
