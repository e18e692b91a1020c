"""NIfTI, MINC and Analyze files ingest into the same ``volumes`` table, checked by nibabel.

Fixtures are nibabel's own test files (shipped in its wheel) plus pairs written here.
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
    "minc1_4d.mnc",  # time-first 4D MINC: refused
    "minc2_1_scale.mnc",  # MINC2 (HDF5): needs h5py
)


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
        "plain.hdr",
        "scaled.hdr",
    }
    assert set(stored) == expected
    for name, row in stored.items():
        img = nib.load(image_folder / name)
        want = np.asarray(img.dataobj)
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
        assert pd.isna(row.patient_key) and row.n_timepoints == (
            want.shape[3] if want.ndim == 4 else 1
        )
    assert (
        stored["scaled.hdr"].dtype == "float32" and stored["minc1_1_scale.mnc"].dtype == "float32"
    )
    assert stored["minc1_1_scale.mnc"].value_scaling == "file_scaling"
    assert stored["anatomical.nii"].dtype == "int16"  # big-endian on disk, native in the store


def test_unsupported_images_are_failures_with_codes_and_img_halves_are_catalogued(ingested):
    report, catalog = ingested
    failures = {(r.subject_kind, r.code) for r in catalog.failures.itertuples()}
    assert failures == {("series", "unsupported_dimensions"), ("file", "codec_unavailable")}
    assert report.failures == 2
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
