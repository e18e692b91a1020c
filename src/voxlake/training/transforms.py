"""Small torch-only volume transforms used by the stream (and usable in a training loop).

Volumes are float tensors shaped (D, H, W) or (C, D, H, W); samples are the stream's
dictionaries (``{"image": ..., "label": ..., ...}``), so MONAI dictionary transforms and
these functions can be mixed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["ct_window", "random_flip", "resize", "zscore"]


def zscore(volume: torch.Tensor, mean: float, std: float, *, eps: float = 1e-6) -> torch.Tensor:
    """Return ``(volume - mean) / std`` (``std`` floored at ``eps`` for constant volumes)."""
    return (volume - float(mean)) / max(float(std), eps)


def ct_window(volume: torch.Tensor, center: float, width: float) -> torch.Tensor:
    """Map the CT window ``[center - width/2, center + width/2]`` (HU) linearly to [0, 1].

    Values outside the window are clipped, e.g. ``ct_window(v, 40, 400)`` for soft tissue.
    """
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = float(center) - float(width) / 2.0
    return ((volume - low) / float(width)).clamp_(0.0, 1.0)


def resize(volume: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Trilinearly resize a (D, H, W) or (C, D, H, W) volume to ``shape`` (D, H, W).

    Uses ``align_corners=False``; the result keeps the input's number of dimensions.
    """
    target = tuple(int(n) for n in shape)
    if len(target) != 3:
        raise ValueError(f"shape must be (D, H, W), got {shape}")
    if volume.dim() not in (3, 4):
        raise ValueError(f"volume must be (D, H, W) or (C, D, H, W), got {tuple(volume.shape)}")
    if tuple(volume.shape[-3:]) == target:
        return volume
    batch = volume.reshape(1, -1, *volume.shape[-3:]).float()
    out = F.interpolate(batch, size=target, mode="trilinear", align_corners=False)
    return out.reshape(*volume.shape[:-3], *target)


def random_flip(
    sample: Mapping[str, Any],
    generator: torch.Generator,
    axes: Sequence[int] = (-3, -2, -1),
    *,
    p: float = 0.5,
    key: str = "image",
) -> dict[str, Any]:
    """Flip ``sample[key]`` along each of ``axes`` independently with probability ``p``.

    Parameters
    ----------
    sample
        Stream sample; only ``sample[key]`` is changed, in a new dictionary.
    generator
        Source of randomness, so augmentation is reproducible per worker.
    axes
        Tensor dimensions that may be flipped (default: the three spatial ones).
    p
        Flip probability per axis.
    key
        Entry holding the volume.

    Returns
    -------
    dict
        A shallow copy of ``sample`` with the (possibly) flipped volume.
    """
    draws = torch.rand(len(axes), generator=generator)
    flip = [int(axis) for axis, draw in zip(axes, draws.tolist(), strict=True) if draw < p]
    out = dict(sample)
    if flip:
        out[key] = torch.flip(sample[key], dims=flip)
    return out
