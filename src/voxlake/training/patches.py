"""Where a random patch lies: a pure function of (seed, epoch, sample) and the volume.

In patch mode a stream's epoch has ``patches_per_volume`` samples per volume; sample ``s``
is patch ``s % patches_per_volume`` of volume ``s // patches_per_volume``. Its origin is
drawn from a generator seeded by (seed, epoch, s) alone, so it does not depend on the
rank, the worker or the number of workers that reads it, and a resumed run draws exactly
the patches the interrupted one would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from voxlake.volumes.foreground import ForegroundIndex

__all__ = ["patch_origin", "sample_seed"]

Sampler = Literal["uniform", "foreground"]

_PATCH_TAG = 0x9A7C4  # separates the patch stream from other per-sample streams
_AUGMENT_TAG = 0xA06


def sample_seed(seed: int, epoch: int, sample: int, purpose: Literal["patch", "augment"]) -> int:
    """A 63-bit seed for one sample's random draws (patch origin or augmentation)."""
    tag = _PATCH_TAG if purpose == "patch" else _AUGMENT_TAG
    state = np.random.SeedSequence([int(seed), int(epoch), int(sample), tag]).generate_state(2)
    return (int(state[0]) << 31 ^ int(state[1])) & ((1 << 63) - 1)


def _centred(dim: int, size: int) -> int:
    # Volume smaller than the patch: pad evenly on both sides.
    return -((size - dim) // 2)


def patch_origin(
    shape: Sequence[int],
    size: Sequence[int],
    *,
    seed: int,
    epoch: int,
    sample: int,
    sampler: Sampler = "uniform",
    foreground: ForegroundIndex | None = None,
    foreground_prob: float = 0.5,
) -> tuple[int, int, int]:
    """The (z, y, x) origin of one random patch.

    Parameters
    ----------
    shape
        Spatial shape of the volume (last three axes).
    size
        Patch size (d, h, w).
    seed, epoch, sample
        Seed the draw (``sample`` is the global sample number of the epoch).
    sampler
        ``"uniform"``: every position with the patch inside the volume is equally
        likely. ``"foreground"``: with probability ``foreground_prob`` the patch is
        centred (then shifted inside the volume) on a point of ``foreground``, the class
        first chosen uniformly among the classes present (nnU-Net's scheme, so rare
        classes are not drowned out); otherwise uniform.
    foreground
        Class-location index of the volume; without points, ``"foreground"`` behaves as
        ``"uniform"``.
    foreground_prob
        Share of foreground-centred patches (MONAI ``RandCropByPosNegLabeld`` with
        ``pos=1, neg=1`` corresponds to 0.5).

    Returns
    -------
    tuple of int
        The origin; along an axis where the volume is smaller than the patch it is
        negative (the patch is centred and padded).
    """
    dims = [int(n) for n in shape[-3:]]
    sizes = [int(n) for n in size]
    if len(dims) != 3 or len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"need a 3D shape and a positive 3D patch size, got {shape}, {size}")
    if not 0.0 <= foreground_prob <= 1.0:
        raise ValueError(f"foreground_prob must be in [0, 1], got {foreground_prob}")
    rng = np.random.default_rng(sample_seed(seed, epoch, sample, "patch"))
    use_foreground = (
        sampler == "foreground"
        and foreground is not None
        and len(foreground.points) > 0
        and rng.random() < foreground_prob
    )
    if use_foreground:
        assert foreground is not None
        classes = foreground.classes
        points = foreground.of_class(classes[int(rng.integers(len(classes)))])
        centre = points[int(rng.integers(len(points)))]
        origin = []
        for dim, extent, c in zip(dims, sizes, centre.tolist(), strict=True):
            if dim < extent:
                origin.append(_centred(dim, extent))
            else:
                origin.append(min(max(int(c) - extent // 2, 0), dim - extent))
    else:
        origin = [
            int(rng.integers(0, dim - extent + 1)) if dim >= extent else _centred(dim, extent)
            for dim, extent in zip(dims, sizes, strict=True)
        ]
    return origin[0], origin[1], origin[2]
