"""Real scanner data from ../shared/data/real against dcm2niix's reference NIfTI."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from voxlake.catalog import open_catalog
from voxlake.config import IngestConfig
from voxlake.ingest import ingest
from voxlake.volumes import read_volume

from ..conftest import SECRET, require_shared_data

pytestmark = [pytest.mark.integration, pytest.mark.real_data]


def as_nifti(data: np.ndarray, affine) -> nib.Nifti1Image:
    """Our (k, j, i) array + RAS affine as the equivalent NIfTI image (i, j, k)."""
    return nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), np.asarray(affine))


def test_dcm_qa_ct_equals_dcm2niix_reference(tmp_path, dask_client):
    source = require_shared_data("dcm_qa_ct", "In")
    reference = require_shared_data(
        "dcm_qa_ct", "Ref_regenerated_dcm2niix", "1A_TRAUMA_PLAIN_HEAD_DM_Head_201.nii.gz"
    )
    report = ingest(
        [source],
        catalog=tmp_path / "cat",
        store=tmp_path / "vol.zarr",
        config=IngestConfig(secret=SECRET),
        client=dask_client,
    )
    catalog = open_catalog(tmp_path / "cat")
    assert report.volumes_written == 1
    # Philips' DIRFILE is a vendor directory file: skipped with a reason, never a crash.
    assert list(catalog.failures.code) == ["not_dicom"] or list(catalog.failures.code) == [
        "dicomdir"
    ]
    row = catalog.volumes.iloc[0]
    assert row.n_instances == 28 and row.modality == "CT" and row.units == "HU"
    data, _ = read_volume(row.store_url, row.store_path)
    ours = nib.as_closest_canonical(as_nifti(data, np.array(row.affine).reshape(4, 4)))
    ref = nib.as_closest_canonical(nib.load(reference))
    assert ours.shape == ref.shape == (512, 512, 28)
    assert np.abs(ours.affine - ref.affine).max() < 1e-3
    ref_data = np.asarray(ref.dataobj)
    assert np.array_equal(np.asarray(ours.dataobj), ref_data)
    assert row.intensity_min == ref_data.min() and row.intensity_max == ref_data.max()
