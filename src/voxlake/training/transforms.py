"""Small torch-only volume transforms used by the stream (and usable in a training loop).

Volumes are float tensors shaped (D, H, W) or (C, D, H, W); samples are the stream's
dictionaries (``{"image": ..., "label": ..., ...}``), so MONAI dictionary transforms and
these functions can be mixed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "Augmentation",
    "augment",
    "ct_window",
    "random_affine",
    "random_flip",
    "resize",
    "zscore",
]


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
        A shallow copy of ``sample`` with the (possibly) flipped volume, and its
        ``valid`` box (``VolumeStream(output="stored")`` patches) flipped along.
    """
    draws = torch.rand(len(axes), generator=generator)
    flip = [int(axis) for axis, draw in zip(axes, draws.tolist(), strict=True) if draw < p]
    out = dict(sample)
    if flip:
        image = sample[key]
        out[key] = torch.flip(image, dims=flip)
        valid = sample.get("valid")
        if valid is not None:
            # A stored-dtype patch's box of read voxels (its padding is zeroed after
            # normalisation, by normalize_on_device) flips with the image.
            valid = valid.clone()
            for axis in flip:
                spatial = axis % image.dim() - (image.dim() - 3)
                if spatial >= 0:
                    size = int(image.shape[axis])
                    lo, hi = int(valid[spatial, 0]), int(valid[spatial, 1])
                    valid[spatial, 0], valid[spatial, 1] = size - hi, size - lo
            out["valid"] = valid
    return out


def _rotation(angles: Sequence[float]) -> torch.Tensor:
    """Rotation matrix (float64) about the z, y and x axes, in that order."""
    a, b, c = (float(v) for v in angles)
    rz = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx = torch.tensor([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return (rz.double() @ ry.double() @ rx.double()).double()


def random_affine(
    volume: torch.Tensor,
    generator: torch.Generator,
    *,
    max_rotation: float = 10.0,
    max_scale: float = 0.1,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Rotate and scale a (C, D, H, W) volume by a small random affine about its centre.

    Angles about each axis are uniform in ``[-max_rotation, max_rotation]`` degrees and
    scale factors per axis uniform in ``[1 - max_scale, 1 + max_scale]``. The transform
    acts in voxel space (not in ``affine_grid``'s normalised space, which would shear
    non-cubic volumes); voxels mapped from outside the volume are 0 (the mean after
    z-scoring). ``mode="nearest"`` suits label maps.
    """
    if volume.dim() != 4:
        raise ValueError(f"volume must be (C, D, H, W), got {tuple(volume.shape)}")
    draws = torch.rand(6, generator=generator, dtype=torch.float64) * 2.0 - 1.0
    angles = (draws[:3] * math.radians(max_rotation)).tolist()
    scales = (1.0 + draws[3:] * max_scale).tolist()
    # Output voxel -> input voxel, in (z, y, x) order with the centre as origin.
    matrix = _rotation(angles) @ torch.diag(torch.tensor(scales, dtype=torch.float64)).inverse()
    sizes = torch.tensor(volume.shape[-3:], dtype=torch.float64)
    # affine_grid works in normalised (x, y, z) coordinates: conjugate by the voxel size.
    normalise = torch.diag(2.0 / sizes)
    theta_zyx = normalise @ matrix @ normalise.inverse()
    flip = torch.tensor([2, 1, 0])
    theta = torch.zeros(1, 3, 4, dtype=torch.float32)
    theta[0, :, :3] = theta_zyx[flip][:, flip].float()
    batch = volume.unsqueeze(0).float()
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.squeeze(0)


@dataclass(frozen=True, kw_only=True)
class Augmentation:
    """Random flips and a small affine applied by the stream to each sample's ``image``.

    Draws come from a generator seeded by (seed, epoch, sample), so augmented samples are
    the same for any number of workers and after a resume.

    Attributes
    ----------
    flip_prob
        Probability of flipping along each of ``flip_axes``.
    flip_axes
        Tensor dimensions of the (C, D, H, W) image that may be flipped.
    affine_prob
        Probability of applying :func:`random_affine` (0 disables it).
    max_rotation, max_scale
        Passed to :func:`random_affine`.
    """

    flip_prob: float = 0.5
    flip_axes: tuple[int, ...] = (-3, -2, -1)
    affine_prob: float = 0.0
    max_rotation: float = 10.0
    max_scale: float = 0.1

    def __post_init__(self) -> None:
        if not (0 <= self.flip_prob <= 1 and 0 <= self.affine_prob <= 1):
            raise ValueError("flip_prob and affine_prob must be in [0, 1]")


def augment(
    sample: Mapping[str, Any], generator: torch.Generator, augmentation: Augmentation
) -> dict[str, Any]:
    """Apply ``augmentation`` to ``sample["image"]`` (flips, then the affine)."""
    out = random_flip(sample, generator, augmentation.flip_axes, p=augmentation.flip_prob)
    if augmentation.affine_prob > 0:
        draw = float(torch.rand(1, generator=generator))
        if draw < augmentation.affine_prob:
            out["image"] = random_affine(
                out["image"],
                generator,
                max_rotation=augmentation.max_rotation,
                max_scale=augmentation.max_scale,
            )
    return out
