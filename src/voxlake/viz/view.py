"""`VolumeView`: a stored volume opened lazily, with what is needed to draw it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["VolumeView"]


@dataclass(frozen=True)
class VolumeView:
    """A stored volume opened lazily, with what is needed to draw it.

    Attributes
    ----------
    array
        The (z, y, x) or (t, z, y, x) array: a lazy Zarr array (slicing reads only the
        chunks touched) or a NumPy array.
    spacing
        Voxel spacing (z, y, x) in mm.
    affine
        4x4 RAS affine mapping (i, j, k, 1) to millimetres.
    units
        Units of the values (``"HU"`` for CT, ``""`` when arbitrary).
    modality
        DICOM modality (``"CT"``, ``"MR"``, ...).
    volume_id
        Catalog id of the volume.
    description
        Series description.
    intensity_range
        1st and 99th percentiles from the catalog, used by the ``"auto"`` window.
    axes
        The array's axes as the catalog records them: ``"zyx"``, ``"tzyx"`` or
        ``"czyx"`` (colour: drawn as RGB); empty means ``"zyx"`` or ``"tzyx"`` by shape.
    """

    array: Any
    spacing: tuple[float, float, float]
    affine: np.ndarray
    units: str = ""
    modality: str = ""
    volume_id: str = ""
    description: str = ""
    intensity_range: tuple[float, float] | None = None
    axes: str = ""

    @property
    def colour(self) -> bool:
        """Whether the first axis holds colour channels (RGB), not time points."""
        return self.axes == "czyx"

    @property
    def title(self) -> str:
        """One-line caption: modality, description, short id and shape."""
        shape = "x".join(str(n) for n in self.array.shape)
        parts = [self.modality, self.description, self.volume_id[:12], f"[{shape}]"]
        return "  ".join(p for p in parts if p)
