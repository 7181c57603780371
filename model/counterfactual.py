"""Counterfactual copies of corrected images: keep what the human map covers, swap the rest.

A copy keeps the pixels where the annotator's map says to look and takes every other pixel from
another image of the round, with the original's label and map. A cue outside the map (a
background, a mark) then no longer agrees with the label, so the branches cannot keep relying
on it; the paper's map loss alone moves where the model looks, not what it decides on. The
copies go through the frozen trunk once, like every other example (the trunk cache of
``model/train.py``), so they cost a forward pass each, not one per epoch.

The blend is soft: the map, upsampled to the image size, is the weight of the original pixel,
so a graded map keeps a graded share of the original.

With `guides`, every example is copied, not only the corrected ones: an example without a human
map is cut by its guide, the attention map of a model that has already learnt from the human
maps where to look. A few corrections then break the cue on every labelled image; the copies of
such an example still carry no human map, so the map loss stays on what a human drew.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.data import InMemoryMapsDataset


def counterfactuals(
    images: torch.Tensor,
    maps: torch.Tensor,
    has_map: torch.Tensor,
    copies: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`copies` counterfactual images of every example that has a map.

    `images` (N, 3, H, W) as the model takes them, `maps` (N, 1, h, w) in [0, 1], `has_map`
    (N,) bool. Returns the new images (M, 3, H, W) and, for each, the index of the example it
    copies (its label and map go with it). A donor is never the example itself; with a single
    example there is no donor, and no copy.
    """
    mapped = torch.nonzero(has_map.bool()).flatten()
    if copies < 1 or len(mapped) == 0 or len(images) < 2:
        return images.new_empty((0, *images.shape[1:])), torch.empty(0, dtype=torch.long)
    source = mapped.repeat_interleave(copies)
    # A donor drawn from the others: an offset in 1..N-1 from the source, modulo N.
    offsets = torch.randint(1, len(images), (len(source),), generator=generator)
    donors = (source + offsets) % len(images)
    weight = F.interpolate(
        maps[source].float(), size=images.shape[-2:], mode="bilinear", align_corners=False
    ).clamp(0.0, 1.0)
    blended = weight * images[source] + (1.0 - weight) * images[donors]
    return blended.to(images.dtype), source


def with_counterfactuals(
    images: torch.Tensor,
    labels: torch.Tensor,
    maps: torch.Tensor,
    has_map: torch.Tensor,
    copies: int,
    seed: int,
    guides: torch.Tensor | None = None,
) -> InMemoryMapsDataset:
    """The fine-tuning set, plus `copies` counterfactual copies of each mapped example (each
    with its original's label and map); `copies=0` gives the set unchanged.

    `guides` (N, 1, h, w), the maps that cut the examples without a human map: with them every
    example is copied (a human map, where there is one, still decides its own copies).
    """
    cut_by, copied = maps, has_map
    if guides is not None:
        if guides.shape != maps.shape:
            raise ValueError(f"guides must be shaped like the maps {tuple(maps.shape)}")
        cut_by = torch.where(has_map.bool().view(-1, 1, 1, 1), maps, guides.to(maps.dtype))
        copied = torch.ones_like(has_map, dtype=torch.bool)
    extra, source = counterfactuals(
        images, cut_by, copied, copies, torch.Generator().manual_seed(seed)
    )
    return InMemoryMapsDataset(
        torch.cat([images, extra]),
        torch.cat([labels, labels[source]]),
        torch.cat([maps, maps[source]]),
        torch.cat([has_map, has_map[source]]),
    )
