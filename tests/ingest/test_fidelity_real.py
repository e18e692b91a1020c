"""Every reference NIfTI under ../shared/data/real against voxlake's volumes (voxlake verify).

References come from two independent converters: dcm2niix (dcm_qa_*) and dicom2nifti
(icometrix). One kind of reference cannot match, pinned down below with evidence: the
dicom2nifti output for Philips enhanced DTI is wrong (3 of its 4 volumes are zeros: it
files frames by TemporalPositionIndex, which is 1 for every DTI frame). The RGB series
(JPEG 2000, stored as colour channels) must match dicom2nifti's RGBA reference.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from voxlake.catalog import open_catalog
from voxlake.config import IngestConfig
from voxlake.ingest import ingest
from voxlake.ingest.verify import verify
from voxlake.volumes import read_volume

from ..conftest import SECRET, require_shared_data

pytestmark = [pytest.mark.integration, pytest.mark.real_data]

_DTI = "icometrix_dicom2nifti/tests/data/philips_enhanced/dti/001"
_RGB = "icometrix_dicom2nifti/tests/data/generic/rgb/001"
DEFECTIVE = {f"{_DTI}_ground_truth.nii.gz", f"{_DTI}_ground_truth_reoriented.nii.gz"}
COLOUR = {f"{_RGB}_ground_truth.nii.gz", f"{_RGB}_ground_truth_reoriented.nii.gz"}


@pytest.mark.slow
def test_every_reference_matches(dask_client, tmp_path):
    root = require_shared_data()
    report = verify(root, root, client=dask_client, workdir=tmp_path)
    lines = report.lines()
    text = "\n".join(lines)
    assert lines[-1] == f"matched {report.matched} of {report.total}"
    # 3 dcm_qa_enh + 1 dcm_qa_ct + 2 dcm_qa_nih + 9 dcm_qa_ts + 19 x 2 icometrix.
    assert report.total == 53, text
    mismatched = {r.reference: r for r in report.results if not r.matched}
    assert set(mismatched) == DEFECTIVE, text
    assert report.matched == 51
    for name in DEFECTIVE:  # same grid, same geometry: only the voxel values disagree
        result = mismatched[name]
        assert result.shape == result.reference_shape == (128, 128, 8, 4)
        assert result.affine_error_mm is not None and result.affine_error_mm < 1e-3
    by_name = {r.reference: r for r in report.results}
    for name in COLOUR:  # (i, j, k, c): every R, G and B value equal, affine within 1e-3 mm
        assert by_name[name].matched and by_name[name].shape == (52, 77, 4, 3), text
    mosaic = by_name["dcm_qa_ts/Ref/9.nii"]  # JPEG 2000 Siemens mosaic
    assert mosaic.matched and mosaic.shape == (64, 64, 35)
    assert by_name["dcm_qa_enh/Ref/Siemens_REST1_w_SMS_PF7-8_6.nii"].shape == (64, 64, 6, 4)


def _ingest_one_volume(source, tmp_path, client):
    """Ingest a folder holding one series; return its catalog row, voxels and attributes."""
    ingest(
        [source],
        catalog=tmp_path / "c",
        store=tmp_path / "s",
        config=IngestConfig(secret=SECRET),
        client=client,
    )
    (row,) = open_catalog(tmp_path / "c").volumes.itertuples()
    data, attrs = read_volume(row.store_url, row.store_path)
    return row, data, attrs


def test_philips_dti_reference_is_defective_and_ours_follows_the_frames(tmp_path, dask_client):
    """Our DTI volumes are the DICOM frames in Dimension Index order; the reference is not."""
    import nibabel as nib

    source = require_shared_data(_DTI)
    reference = nib.load(require_shared_data(f"{_DTI}_ground_truth.nii.gz"))
    bvals = require_shared_data(f"{_DTI}_ground_truth.bval").read_text().split()
    row, ours, _ = _ingest_one_volume(source, tmp_path, dask_client)
    assert ours.shape == (4, 8, 128, 128) and row.layout == "enhanced"
    assert list(row.b_values) == [float(v) for v in bvals] == [0, 1300, 1300, 1300]
    vectors = np.asarray(row.b_vectors_patient).reshape(4, 3)
    np.testing.assert_allclose(vectors[1:3], [[1, 0, 0], [0, -1, 0]], atol=1e-6)
    # Independent check: decode the file with pydicom, order frames by Dimension Index
    # Values (stack, in-stack position, b-value index, gradient index), apply the rescale.
    ds = pydicom.dcmread(next(p for p in source.iterdir() if p.is_file()))
    frames = ds.pixel_array.astype(np.float64)
    groups = ds.PerFrameFunctionalGroupsSequence
    dims = [tuple(g.FrameContentSequence[0].DimensionIndexValues) for g in groups]
    slope = float(groups[0].PixelValueTransformationSequence[0].RescaleSlope)
    for t in range(4):
        for z in range(8):
            index = sorted(range(32), key=lambda i: dims[i])[z * 4 + t]
            assert dims[index][1] == z + 1  # in-stack position runs along the slice normal
            np.testing.assert_allclose(ours[t, z], frames[index] * slope, rtol=1e-6)
    # The reference: volumes 1-3 are all zero although every DICOM frame has signal, and
    # volume 0 holds the *last* gradient direction (what filing by TemporalPositionIndex,
    # 1 for all frames, leaves behind).
    ref = np.asarray(reference.dataobj)
    assert all(frames[i].max() > 0 for i in range(32))
    assert all(not ref[..., t].any() for t in (1, 2, 3))
    canonical = nib.as_closest_canonical(
        nib.Nifti1Image(ours[3].transpose(2, 1, 0), np.asarray(row.affine).reshape(4, 4))
    )
    ref0 = nib.as_closest_canonical(nib.Nifti1Image(ref[..., 0], reference.affine))
    np.testing.assert_allclose(np.asarray(canonical.dataobj), ref0.get_fdata(), rtol=1e-6)


@pytest.mark.slow
def test_verify_cli_prints_one_line_per_reference(tmp_path):
    from voxlake.cli import app

    source = require_shared_data("dcm_qa_enh", "In")
    refs = require_shared_data("dcm_qa_enh", "Ref")
    result = CliRunner().invoke(app, ["verify", str(source), str(refs), "--workers", "1"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith(("match", "MIS"))]
    assert len(lines) == 4 and lines[-1] == "matched 3 of 3"
    assert all(line.startswith("match ") for line in lines[:3])
    assert "Philips_WIP_B0_NS_801_e1.nii" in result.output  # dcm2niix precise Philips scaling


def test_rgb_series_is_stored_as_channels_equal_to_pydicom_and_the_reference(tmp_path, dask_client):
    """Colour channels first (c, z, y, x), each slice equal to pydicom's own decoding, and
    each channel equal to the field of dicom2nifti's RGBA reference (alpha all opaque)."""
    import nibabel as nib

    from voxlake.ingest.verify import compare_volume

    source = require_shared_data(_RGB)
    reference = nib.load(require_shared_data(f"{_RGB}_ground_truth.nii.gz"))
    row, ours, attrs = _ingest_one_volume(source, tmp_path, dask_client)
    assert ours.shape == (3, 4, 77, 52) and ours.dtype == np.uint8
    assert row.axes == attrs["axes"] == "czyx" and row.n_timepoints == 1 and row.n_slices == 4
    datasets = [pydicom.dcmread(p) for p in sorted(source.iterdir())]
    normal = np.cross(*np.reshape(datasets[0].ImageOrientationPatient, (2, 3)))
    datasets.sort(key=lambda ds: float(np.dot(ds.ImagePositionPatient, normal)))
    for z, ds in enumerate(datasets):
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        np.testing.assert_array_equal(ours[:, z], ds.pixel_array.transpose(2, 0, 1))
    fields = np.asarray(reference.dataobj)
    assert set(fields.dtype.names) == {"R", "G", "B", "A"} and (fields["A"] == 255).all()
    ok, detail, *_ = compare_volume(ours, np.asarray(row.affine).reshape(4, 4), reference)
    assert ok, detail
    # Statistics pool the three channels.
    assert row.intensity_min == float(ours.min()) and row.intensity_max == float(ours.max())
    assert abs(row.intensity_mean - float(ours.mean())) < 1e-6
