"""Synthetic Siemens mosaics (ascending and descending tile order) against truth and dcm2niix.

The mosaic is built from a synthetic series whose volume and affine are known; the CSA
image header (NumberOfImagesInMosaic, SliceNormalVector) is written in the CSA2 binary
layout nibabel and dcm2niix read.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest

from voxlake.catalog import open_catalog
from voxlake.config import IngestConfig
from voxlake.ingest import ingest
from voxlake.ingest.frames import frame_columns
from voxlake.ingest.verify import compare_volume
from voxlake.testing import write_series
from voxlake.testing.profiles import sample_specs
from voxlake.volumes import read_volume

from ..conftest import SECRET
from .test_fidelity_dcm2niix import _dcm2niix

pytestmark = pytest.mark.integration


def csa2(tags: dict[str, tuple[str, list[str]]]) -> bytes:
    """A Siemens CSA2 header ("SV10") holding ``name -> (VR, values)``."""
    out = b"SV10\x04\x03\x02\x01" + struct.pack("<2I", len(tags), 77)
    for name, (vr, values) in tags.items():
        out += struct.pack("<64si4s3i", name.encode(), len(values), vr.encode(), 0, len(values), 77)
        for value in values:
            data = value.encode() + b"\0"
            out += struct.pack("<4i", len(data), len(data), 77, len(data))
            out += data + b"\0" * (-len(data) % 4)
    return out


def write_mosaic(
    folder,
    *,
    descending: bool,
    n_slices: int = 7,
    tiles_hidden: bool = False,
    protocol_slice: int = 0,
):
    """One mosaic file holding a synthetic series; returns (path, volume, affine)."""
    base = next(s for s in sample_specs(profile="tiny", seed=0) if s.modality == "MR")
    spec = dataclasses.replace(base, rows=12, columns=10, n_slices=n_slices, series_number=3)
    written = write_series(spec, folder / "classic", seed=4)
    volume = written.expected_volume()
    grid = math.ceil(math.sqrt(n_slices))
    rows, cols = spec.rows, spec.columns
    mosaic = np.zeros((grid * rows, grid * cols), dtype=np.uint16)
    order = list(range(n_slices))[::-1] if descending else list(range(n_slices))
    for tile, k in enumerate(order):
        r0, c0 = divmod(tile, grid)
        mosaic[r0 * rows : (r0 + 1) * rows, c0 * cols : (c0 + 1) * cols] = volume[k]
    first = spec.slice_positions()[order[0]]
    normal = spec.slice_normal * (-1 if descending else 1)
    ps = spec.pixel_spacing
    corner = (
        first
        - spec.row_direction * ps[1] * (grid * cols - cols) / 2
        - spec.column_direction * ps[0] * (grid * rows - rows) / 2
    )
    ds = pydicom.dcmread(written.files[0])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    ds.Manufacturer = "SIEMENS"
    ds.Rows, ds.Columns = mosaic.shape
    ds.ImagePositionPatient = [f"{v:.6f}" for v in corner]
    ds.SpacingBetweenSlices = f"{spec.slice_spacing:g}"
    ds.AcquisitionMatrix = [0, cols, rows, 0]
    ds.PixelRepresentation = 0
    ds.PixelData = mosaic.tobytes()
    block = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    tags = {
        "SliceNormalVector": ("FD", [f"{v:.8f}" for v in normal]),
        "ProtocolSliceNumber": ("IS", [str(protocol_slice)]),
    }
    if not tiles_hidden:
        tags["NumberOfImagesInMosaic"] = ("US", [str(n_slices)])
    block.add_new(0x10, "OB", csa2(tags))
    path = folder / "in" / "mosaic.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path, volume, written.expected_affine()


@pytest.mark.parametrize("descending", [False, True], ids=["ascending", "descending"])
def test_mosaic_tiles_assemble_exactly_and_agree_with_dcm2niix(descending, tmp_path, dask_client):
    path, volume, affine = write_mosaic(tmp_path, descending=descending)
    columns = frame_columns(pydicom.dcmread(path))
    assert (columns["layout"], columns["mosaic_tiles"]) == ("mosaic", 7)
    ingest(
        [path.parent],
        catalog=tmp_path / "c",
        store=tmp_path / "s",
        config=IngestConfig(secret=SECRET),
        client=dask_client,
    )
    (row,) = open_catalog(tmp_path / "c").volumes.itertuples()
    data, _ = read_volume(row.store_url, row.store_path)
    ours = np.asarray(row.affine).reshape(4, 4)
    assert row.layout == "mosaic" and data.shape == (7, 12, 10)
    assert np.array_equal(data, volume)  # sorted along the normal whatever the tile order
    np.testing.assert_allclose(ours, affine, atol=1e-4)
    out = tmp_path / "dcm2niix"
    out.mkdir()
    subprocess.run(
        [_dcm2niix(), "-z", "n", "-b", "n", "-f", "%s", "-o", str(out), str(path.parent)],
        capture_output=True,
        check=True,
    )
    (ref,) = [nib.load(p) for p in out.glob("*.nii")]
    ok, detail, *_ = compare_volume(data, ours, ref)
    assert ok, detail


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"tiles_hidden": True}, "mosaic_tiles_unknown"),
        ({"protocol_slice": 3}, "mosaic_order_ambiguous"),  # dcm2niix: "untested", flips
    ],
)
def test_mosaics_that_cannot_be_placed_are_refused(changes, code, tmp_path, dask_client):
    path, _, _ = write_mosaic(tmp_path, descending=False, **changes)
    ingest(
        [path.parent],
        catalog=tmp_path / "c",
        store=tmp_path / "s",
        config=IngestConfig(secret=SECRET),
        client=dask_client,
    )
    catalog = open_catalog(tmp_path / "c")
    assert catalog.volumes.empty
    assert [f.code for f in catalog.failures.itertuples()] == [code]
