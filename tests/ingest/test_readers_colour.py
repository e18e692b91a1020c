"""Colour DICOM stored as channels (c, z, y, x): store layout, OME-Zarr axes, pyramid.

The truth is written here (numpy), independent of the reader: 8-bit RGB in planar
configuration 1, 16-bit RGB in planar configuration 0, and JPEG baseline YBR_FULL_422
(the usual ultrasound and endoscopy encoding) whose truth is Pillow's own decoding of
the same JPEG. Uncompressed YBR_FULL and palette colour are cases of the hostile corpus
(``voxlake.testing._hostile_cases``).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pydicom
import pytest
import zarr
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from voxlake.catalog import open_catalog
from voxlake.config import IngestConfig, PreprocessConfig
from voxlake.ingest import ingest
from voxlake.keys import keyed_hash
from voxlake.testing import write_series
from voxlake.testing.profiles import sample_specs
from voxlake.volumes import read_volume
from voxlake.volumes.layout import choose_layout, ome_multiscales
from voxlake.volumes.pyramid import downsample2

from ..conftest import SECRET

pytestmark = pytest.mark.integration


def _spec(name: str):
    base = next(s for s in sample_specs(profile="tiny", seed=0) if s.modality == "MR")
    return dataclasses.replace(
        base,
        rows=10,
        columns=14,
        n_slices=6,
        series_description=name,
        series_instance_uid=f"{base.series_instance_uid}.{sum(map(ord, name))}",
    )


def _to_colour(written, planes: np.ndarray, *, bits: int, planar: int) -> None:
    """Rewrite each file (spatial order) as RGB holding ``planes[:, z]`` (c, y, x)."""
    for z, path in enumerate(written.files):
        ds = pydicom.dcmread(path)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "RGB"
        ds.PlanarConfiguration = planar
        ds.BitsAllocated = ds.BitsStored = bits
        ds.HighBit, ds.PixelRepresentation = bits - 1, 0
        data = planes[:, z] if planar else planes[:, z].transpose(1, 2, 0)
        ds.PixelData = np.ascontiguousarray(data).astype(f"<u{bits // 8}").tobytes()
        ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def colour(tmp_path_factory, dask_client):
    root = tmp_path_factory.mktemp("colour")
    rng = np.random.default_rng(7)
    truth = {}
    for name, bits, planar in (("rgb8_planar1", 8, 1), ("rgb16_planar0", 16, 0)):
        written = write_series(_spec(name), root / "in" / name)
        planes = rng.integers(0, 2**bits, (3, 6, 10, 14)).astype(f"u{bits // 8}")
        _to_colour(written, planes, bits=bits, planar=planar)
        truth[name] = (written, planes)
    written = write_series(_spec("ybr_jpeg"), root / "in" / "ybr_jpeg")
    decoded = []
    for path in written.files:  # spatial order
        ds = pydicom.dcmread(path)
        # Smooth colour: chroma upsampling (which decoders do differently) then barely
        # matters; random noise would differ by tens of levels between decoders.
        y, x = np.mgrid[0:10, 0:14]
        phase = rng.uniform(0, 2 * np.pi, 3)
        rgb = np.stack([128 + 100 * np.sin(x / 5 + y / 7 + p) for p in phase], -1)
        rgb = rgb.astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(rgb, "RGB").save(buffer, format="JPEG", quality=95, subsampling=1)
        decoded.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "YBR_FULL_422"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.save_as(path, enforce_file_format=True)
    truth["ybr_jpeg"] = (written, np.stack(decoded).transpose(3, 0, 1, 2))
    ingest(
        [root / "in"],
        catalog=root / "c",
        store=root / "s",
        config=IngestConfig(secret=SECRET, preprocess=PreprocessConfig(pyramid_levels=1)),
        client=dask_client,
    )
    catalog = open_catalog(root / "c")
    assert catalog.failures.empty
    return truth, catalog


@pytest.mark.parametrize("name", ["rgb8_planar1", "rgb16_planar0"])
def test_colour_is_stored_channels_first_with_ome_channel_axis(colour, name):
    truth, catalog = colour
    written, planes = truth[name]
    volumes = catalog.volumes.set_index("series_key")
    row = volumes.loc[keyed_hash(SECRET, "series", written.spec.series_instance_uid)]
    data, attrs = read_volume(row["store_url"], row["store_path"])
    assert data.dtype == planes.dtype and np.array_equal(data, planes)
    assert row["axes"] == attrs["axes"] == "czyx" and list(row["shape"]) == [3, 6, 10, 14]
    np.testing.assert_allclose(
        np.reshape(row["affine"], (4, 4)), written.expected_affine(), atol=1e-4
    )
    group = zarr.open_group(f"{row['store_url']}/{row['store_path']}", mode="r")
    (multiscale,) = group.attrs["ome"]["multiscales"]
    assert multiscale["axes"][0] == {"name": "c", "type": "channel"}
    assert [a["name"] for a in multiscale["axes"]] == ["c", "z", "y", "x"]
    for dataset in multiscale["datasets"]:  # one value per axis; channels never scaled
        for transform in dataset["coordinateTransformations"]:
            values = transform.get("scale", transform.get("translation"))
            assert len(values) == 4
        assert dataset["coordinateTransformations"][0]["scale"][0] == 1.0
    level0, level1 = group["0"], group["1"]
    assert level0.metadata.dimension_names == ("c", "z", "y", "x")
    assert level0.chunks[0] == 1 and level0.shards[0] == 3  # one channel a chunk
    assert level1.shape == (3, 3, 5, 7)  # (z, y, x) halved, channels kept
    np.testing.assert_array_equal(level1[...], downsample2(planes))
    assert row["intensity_max"] == planes.max() and row["intensity_min"] == planes.min()


def test_jpeg_ybr_full_422_is_stored_as_rgb(colour):
    truth, catalog = colour
    written, expected = truth["ybr_jpeg"]
    volumes = catalog.volumes.set_index("series_key")
    row = volumes.loc[keyed_hash(SECRET, "series", written.spec.series_instance_uid)]
    data, _ = read_volume(row["store_url"], row["store_path"])
    assert data.shape == (3, 6, 10, 14) and data.dtype == np.uint8 and row["axes"] == "czyx"
    # Two JPEG decoders (libjpeg through pylibjpeg, and Pillow) round the inverse DCT,
    # the chroma upsampling and the colour conversion differently by a few levels; a
    # channel mix-up or a missing YBR -> RGB conversion would be off by tens.
    error = np.abs(data.astype(int) - expected.astype(int))
    assert error.max() <= 8 and error.mean() < 1.0
    swapped = np.abs(data[::-1].astype(int) - expected.astype(int)).mean()
    assert swapped > 20  # the channels do differ, so the check can tell them apart
    assert "1.2.840.10008.1.2.4.50" in row["decoder"]


def test_layout_and_ome_metadata_for_channel_axes():
    layout = choose_layout((3, 200, 100, 90), axes="czyx")
    assert layout.chunks == (1, 64, 64, 64) and layout.shards[0] == 3
    assert choose_layout((5, 200, 100, 90)).shards[0] == 1  # time: one timepoint a shard
    ome = ome_multiscales("v", (2.0, 0.5, 0.5), ndim=4, levels=1, axes="czyx")
    (multiscale,) = ome["multiscales"]
    assert multiscale["axes"][0] == {"name": "c", "type": "channel"}
    level1 = multiscale["datasets"][1]["coordinateTransformations"]
    assert level1[0]["scale"] == [1.0, 4.0, 1.0, 1.0]
    assert level1[1]["translation"] == [0.0, 1.0, 0.25, 0.25]
    time = ome_multiscales("v", (2.0, 0.5, 0.5), ndim=4, time_step=2.5)["multiscales"][0]
    assert time["axes"][0]["type"] == "time"
