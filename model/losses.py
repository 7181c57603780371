"""The losses of ABN and of the paper's fine-tuning (section 4.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.abn import ABNOutput


def abn_loss(output: ABNOutput, targets: torch.Tensor) -> torch.Tensor:
    """L_att + L_per: both branches classify, unweighted, as in the ABN paper."""
    return F.cross_entropy(output.attention_logits, targets) + F.cross_entropy(
        output.perception_logits, targets
    )


def map_loss(attention: torch.Tensor, human: torch.Tensor, has_map: torch.Tensor) -> torch.Tensor:
    """||M'(x) - M(x)||_2 per sample (the L2 norm over the map), averaged over mapped samples.

    Samples without a human map (`has_map` False) contribute nothing; a batch with none gives 0,
    so such samples still train on the classification losses alone.
    """
    if not bool(has_map.any()):
        return attention.sum() * 0.0
    diff = (attention[has_map] - human[has_map].to(attention.dtype)).flatten(1)
    return torch.linalg.vector_norm(diff, ord=2, dim=1).mean()


def finetune_loss(
    output: ABNOutput,
    targets: torch.Tensor,
    human: torch.Tensor,
    has_map: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """L = L_att + L_per + gamma * ||M' - M||_2, the paper's fine-tuning objective."""
    return abn_loss(output, targets) + gamma * map_loss(output.attention, human, has_map)


def dont_look_loss(
    gradients: torch.Tensor, human: torch.Tensor, has_map: torch.Tensor
) -> torch.Tensor:
    """How much the decision depends on what the human map leaves out ("don't look here").

    `gradients` are those of the summed log-probabilities with respect to the branches' input
    features (N, C, h, w); the penalty is their squared size where the map is 0, summed per
    sample and averaged over mapped samples: a feature-level version of the input-gradient
    penalty of "right for the right reasons" (Ross et al., 2017). Samples without a map add 0.
    """
    if not bool(has_map.any()):
        return gradients.sum() * 0.0
    outside = 1.0 - human.to(gradients.dtype)
    if outside.shape[-2:] != gradients.shape[-2:]:
        outside = F.interpolate(outside, size=gradients.shape[-2:], mode="bilinear")
    penalty = (outside * gradients).pow(2).flatten(1).sum(dim=1)
    return penalty[has_map].mean()
