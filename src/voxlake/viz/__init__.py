"""Pictures of stored volumes: tri-planar views, slice montages and CT windows.

``voxlake show CATALOG VOLUME_ID --out view.png`` draws these from the command line;
in a notebook, :func:`show_volume` returns the matplotlib figure.

Orientation convention
----------------------
Volumes are stored as arrays indexed (k, j, i) = (slice, row, column), with the RAS
affine of (i, j, k) in the catalog row (see ``docs/concepts.md``). Before drawing, each
array axis is matched to the patient axis its affine column points along most, and
flipped where needed, so every picture follows the radiological convention whatever the
acquisition (head-first, feet-first, sagittal or coronal stacks):

- axial: anterior at the top, the patient's right on the image's left;
- coronal: superior at the top, the patient's right on the image's left;
- sagittal: superior at the top, anterior on the image's left.

Oblique volumes are shown in the nearest of these orientations without resampling, so
their anatomy looks slightly tilted, as it is in the stored voxels. Panels are drawn in
millimetres (the image extent is ``voxels x spacing``), so their aspect ratios are the
physical ones: a 5 mm slice looks five times as tall as a 1 mm one.

Only the planes that are drawn are read: slicing the lazy Zarr array fetches just the
chunks that a plane crosses, so pictures of large volumes are quick. Figures are built
on matplotlib's Agg canvas directly; pyplot and its global state are never touched.
"""

from __future__ import annotations

from voxlake.viz.catalog import load_volume, show_volume
from voxlake.viz.figures import (
    IMAGE_FORMATS,
    Plane,
    image_format,
    plot_montage,
    plot_triplanar,
    save_figure,
)
from voxlake.viz.orientation import display_orientation
from voxlake.viz.view import VolumeView
from voxlake.viz.windows import WINDOWS, resolve_window

__all__ = [
    "IMAGE_FORMATS",
    "WINDOWS",
    "Plane",
    "VolumeView",
    "display_orientation",
    "image_format",
    "load_volume",
    "plot_montage",
    "plot_triplanar",
    "resolve_window",
    "save_figure",
    "show_volume",
]
