"""NIfTI, MINC and Analyze files ingest into the same ``volumes`` table, checked by nibabel.

Fixtures are nibabel's own test files (shipped in its wheel) plus pairs, a colour NIfTI
and a 5D NIfTI written here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from voxlake.catalog import open_catalog
from voxlake.config import IngestConfig
from voxlake.ingest import ingest
from voxlake.ingest.readers.nifti import sniff_image_format
from voxlake.volumes import read_volume

from ..conftest import SECRET

pytestmark = pytest.mark.integration

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
FILES = (
    "anatomical.nii",  # big-endian int16
    "example4d.nii.gz",  # 4D
    "example_nifti2.nii.gz",  # NIfTI-2, 4D
    "standard.nii.gz",
    "minc1_1_scale.mnc",  # MINC1: values scaled by image-min/max
    "minc1_4d.mnc",  # 4D MINC1: nibabel gives (t, i, j, k)
    "minc2_1_scale.mnc",  # MINC2 (HDF5, read with h5py)
    "minc2_4d.mnc",  # 4D MINC2
    "minc2-4d-d.mnc",  # 4D MINC2, float64, dimensions (time, x, y, z)
    "small.mnc",  # MINC2, anisotropic, int16 scaled
)
RGB = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])


def nibabel_channels_last(img) -> np.ndarray:
    """nibabel's array as (i, j, k[, t | c]): MINC's time moved last, colour fields split."""
    want = np.asarray(img.dataobj)
    if isinstance(img, nib.minc1.Minc1Image) and want.ndim == 4:
        want = want.transpose(1, 2, 3, 0)
    if want.dtype.fields is not None:
        want = np.stack([want[name] for name in want.dtype.names], axis=-1)
    return want


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for name in FILES:
        shutil.copy(NIB_DATA / name, folder / name)
    anat = nib.load(folder / "anatomical.nii")
    data = np.asarray(anat.dataobj)
    nib.save(nib.AnalyzeImage(data.astype(np.int16), anat.affine), folder / "plain.hdr")
    scaled = nib.Nifti1Pair(data.astype(np.int16), anat.affine)
    scaled.header.set_slope_inter(0.5, 10.0)
    nib.save(scaled, folder / "scaled.hdr")
    rgb = np.zeros((5, 6, 4), dtype=RGB)
    rng = np.random.default_rng(0)
    for name in "RGB":
        rgb[name] = rng.integers(0, 256, rgb.shape)
    nib.save(nib.Nifti1Image(rgb, np.diag([2.0, 3.0, 4.0, 1.0])), folder / "rgb.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2, 2), np.int16), np.eye(4)), folder / "5d.nii")
    return folder


@pytest.fixture(scope="module")
def ingested(image_folder, tmp_path_factory, dask_client):
    root = tmp_path_factory.mktemp("image-ingest")
    report = ingest(
        [image_folder],
        catalog=root / "c",
        store=root / "s",
        config=IngestConfig(secret=SECRET),
        client=dask_client,
    )
    return report, open_catalog(root / "c")


def _name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def test_each_file_matches_nibabel(image_folder, ingested):
    _, catalog = ingested
    instances = catalog.instances.set_index("series_key")
    stored = {}
    for row in catalog.volumes.itertuples():
        stored[_name(instances.loc[row.series_key, "url"])] = row
    expected = {
        "anatomical.nii",
        "example4d.nii.gz",
        "example_nifti2.nii.gz",
        "standard.nii.gz",
        "minc1_1_scale.mnc",
        "minc1_4d.mnc",
        "minc2_1_scale.mnc",
        "minc2_4d.mnc",
        "minc2-4d-d.mnc",
        "small.mnc",
        "plain.hdr",
        "scaled.hdr",
        "rgb.nii.gz",
    }
    assert set(stored) == expected
    for name, row in stored.items():
        img = nib.load(image_folder / name)
        want = nibabel_channels_last(img)
        data, attrs = read_volume(row.store_url, row.store_path)
        order = tuple(range(data.ndim))[::-1]
        got = data.transpose(order)
        assert got.shape == want.shape, name
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
        else:
            assert np.array_equal(got, want) and data.dtype == want.dtype.newbyteorder("="), name
        np.testing.assert_allclose(np.asarray(row.affine).reshape(4, 4), img.affine, atol=1e-6)
        np.testing.assert_allclose(np.asarray(attrs["affine"]), img.affine, atol=1e-6)
        assert row.layout == (
            "minc" if name.endswith(".mnc") else "analyze" if name == "plain.hdr" else "nifti"
        )
        colour = np.asarray(img.dataobj).dtype.fields is not None
        assert row.axes == ("czyx" if colour else "tzyx" if want.ndim == 4 else "zyx"), name
        assert pd.isna(row.patient_key) and row.n_timepoints == (
            want.shape[3] if want.ndim == 4 and not colour else 1
        )
    assert (
        stored["scaled.hdr"].dtype == "float32" and stored["minc1_1_scale.mnc"].dtype == "float32"
    )
    assert stored["minc1_1_scale.mnc"].value_scaling == "file_scaling"
    assert stored["anatomical.nii"].dtype == "int16"  # big-endian on disk, native in the store
    assert stored["minc2_4d.mnc"].shape.tolist() == [2, 20, 20, 10]  # (t, k, j, i)
    assert stored["rgb.nii.gz"].shape.tolist() == [3, 4, 6, 5]  # (c, k, j, i)
    assert stored["rgb.nii.gz"].dtype == "uint8"


def test_unsupported_images_are_failures_with_codes_and_img_halves_are_catalogued(ingested):
    report, catalog = ingested
    failures = {(r.subject_kind, r.code) for r in catalog.failures.itertuples()}
    assert failures == {("series", "unsupported_dimensions")}  # the 5D NIfTI
    assert report.failures == 1
    halves = catalog.instances[catalog.instances.file_format == "image_data"]
    assert sorted(_name(u) for u in halves.url) == ["plain.img", "scaled.img"]
    assert not halves.has_pixels.any()
    headers = catalog.instances[catalog.instances.file_format.isin(["nifti", "minc", "analyze"])]
    assert all("descrip" not in h for h in headers.header_json)  # free text never copied


def test_sniffing_uses_magic_numbers_not_only_names(tmp_path):
    nii = (NIB_DATA / "example4d.nii.gz").read_bytes()
    assert sniff_image_format("/x/renamed.bin", nii) == "nifti"
    assert sniff_image_format("/x/a.hdr", (NIB_DATA / "analyze.hdr").read_bytes()) == "analyze"
    assert sniff_image_format("/x/a.dcm", b"\0" * 128 + b"DICM" + b"\0" * 400) is None
    assert sniff_image_format("/x/lonely.img", b"\0" * 64) is None  # no .hdr next to it
