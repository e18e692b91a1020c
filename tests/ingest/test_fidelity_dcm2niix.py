"""Synthetic series with hard geometry, converted by voxlake and by the dcm2niix binary.

Either the two agree (voxels equal after reorientation, affines within 1e-3 mm), or
dcm2niix had to guess (it says so on stdout) and voxlake either gets the volume the
generator defines exactly or records a precise failure instead of a wrong volume.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from voxlake.catalog import open_catalog
from voxlake.config import IngestConfig
from voxlake.ingest import ingest
from voxlake.ingest.verify import compare_volume
from voxlake.testing import write_series
from voxlake.testing.profiles import sample_specs
from voxlake.volumes import read_volume

from ..conftest import SECRET

pytestmark = pytest.mark.integration

OBLIQUE = (0.96, 0.0784, -0.2688, 0.0, 0.96, 0.28)  # orthonormal, exact in decimal
TILT_DEG = 12.0


def _dcm2niix() -> str:
    found = shutil.which("dcm2niix", path=str(Path(sys.executable).parent)) or shutil.which(
        "dcm2niix"
    )
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("dcm2niix (dev dependency) is not installed")
        pytest.skip("dcm2niix not installed")
    return found


def _spec(name: str, **changes):
    base = next(s for s in sample_specs(profile="tiny", seed=0) if s.modality == "CT")
    return dataclasses.replace(
        base,
        rows=24,
        columns=20,
        n_slices=8,
        series_number=1,
        series_description=name,
        series_instance_uid=f"{base.series_instance_uid}.{sum(map(ord, name))}",
        **changes,
    )


def _move(folder: Path, shift) -> None:
    """Rewrite ImagePositionPatient of the spatially sorted files: slice k moves by shift(k)."""
    files = sorted(
        folder.glob("*.dcm"),
        key=lambda f: float(np.asarray(pydicom.dcmread(f).ImagePositionPatient, float)[2]),
    )
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        position = np.asarray(ds.ImagePositionPatient, dtype=float) + shift(k)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.save_as(path)


def _run_both(folder: Path, tmp_path: Path, client, **config):
    out = tmp_path / "dcm2niix"
    out.mkdir()
    done = subprocess.run(
        [_dcm2niix(), "-z", "n", "-b", "n", "-f", "%s", "-o", str(out), str(folder)],
        capture_output=True,
        text=True,
        check=True,
    )
    ingest(
        [folder],
        catalog=tmp_path / "c",
        store=tmp_path / "s",
        config=IngestConfig(secret=SECRET, **config),
        client=client,
    )
    catalog = open_catalog(tmp_path / "c")
    return catalog, {p.name: nib.load(p) for p in sorted(out.glob("*.nii"))}, done.stdout


def _volume(row):
    data, _ = read_volume(row.store_url, row.store_path)
    return data, np.asarray(row.affine, dtype=float).reshape(4, 4)


@pytest.mark.parametrize(
    "changes",
    [
        {"orientation": OBLIQUE},
        {"reverse_slice_direction": True},
        {"orientation": (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)},  # feet first
    ],
    ids=["oblique", "reversed-slice-order", "feet-first"],
)
def test_agrees_with_dcm2niix(changes, tmp_path, dask_client):
    written = write_series(_spec("agree", **changes), tmp_path / "in")
    catalog, refs, _ = _run_both(tmp_path / "in", tmp_path, dask_client)
    (row,) = catalog.volumes.itertuples()
    (ref,) = refs.values()
    data, affine = _volume(row)
    ok, detail, *_ = compare_volume(data, affine, ref)
    assert ok, detail
    assert np.array_equal(data, written.expected_volume())
    np.testing.assert_allclose(affine, written.expected_affine(), atol=1e-4)


def test_4d_agrees_with_dcm2niix(tmp_path, dask_client):
    spec = _spec("fourd")
    folder = tmp_path / "in"
    truth = []
    for t in (1, 2, 3):  # same positions, new pixels and SOP instances per timepoint
        written = write_series(spec, tmp_path / f"t{t}", seed=t)
        truth.append(written.expected_volume())
        for path in written.files:
            ds = pydicom.dcmread(path)
            ds.TemporalPositionIdentifier = str(t)
            ds.AcquisitionNumber = str(t)
            ds.InstanceNumber = str(int(ds.InstanceNumber) + 100 * t)
            folder.mkdir(exist_ok=True)
            ds.save_as(folder / f"t{t}_{path.name}")
    catalog, refs, _ = _run_both(folder, tmp_path, dask_client)
    (row,) = catalog.volumes.itertuples()
    data, affine = _volume(row)
    assert data.shape == (3, 8, 24, 20) and row.n_timepoints == 3
    assert np.array_equal(data, np.stack(truth))
    (ref,) = refs.values()
    ok, detail, *_ = compare_volume(data, affine, ref)
    assert ok, detail


def test_shuffled_oblique_series_is_exact_where_dcm2niix_guesses(tmp_path, dask_client):
    spec = _spec("shuffled", orientation=OBLIQUE, shuffle_instance_numbers=True)
    written = write_series(spec, tmp_path / "in")
    catalog, refs, stdout = _run_both(tmp_path / "in", tmp_path, dask_client)
    (row,) = catalog.volumes.itertuples()
    data, affine = _volume(row)
    assert np.array_equal(data, written.expected_volume())  # sorted along the normal
    np.testing.assert_allclose(affine, written.expected_affine(), atol=1e-4)
    results = [compare_volume(data, affine, ref)[0] for ref in refs.values()]
    if not any(results):  # dcm2niix sorts by InstanceNumber here, and says so
        assert "Instance Number (0020,0013) order is not spatial" in stdout


def test_missing_slice_is_a_failure_where_dcm2niix_writes_a_volume(tmp_path, dask_client):
    written = write_series(_spec("missing"), tmp_path / "in")
    spatial = sorted(written.files, key=lambda f: pydicom.dcmread(f).ImagePositionPatient[2])
    spatial[3].unlink()
    catalog, refs, stdout = _run_both(tmp_path / "in", tmp_path, dask_client)
    assert catalog.volumes.empty
    (failure,) = catalog.failures.itertuples()
    assert (failure.code, failure.subject_kind) == ("missing_slice", "series")
    assert failure.message == "1 slice(s) missing from a regular stack"
    assert refs  # dcm2niix still writes volumes, warning that spacing varies
    assert "Interslice distance varies" in stdout or "Missing images" in stdout


def test_gantry_tilt_keeps_the_exact_sheared_geometry(tmp_path, dask_client):
    spec = _spec("tilt")
    write_series(spec, tmp_path / "in")
    shear = spec.slice_spacing * math.tan(math.radians(TILT_DEG))
    _move(tmp_path / "in", lambda k: k * shear * spec.column_direction)
    catalog, refs, stdout = _run_both(tmp_path / "in", tmp_path, dask_client)
    (row,) = catalog.volumes.itertuples()
    data, affine = _volume(row)
    assert row.gantry_tilt_deg == pytest.approx(TILT_DEG, abs=1e-3)
    # Every voxel centre lands where the DICOM header puts it (PS3.3 C.7.6.2.1.1).
    headers = sorted(
        (pydicom.dcmread(p) for p in (tmp_path / "in").glob("*.dcm")),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
    )
    for k, ds in enumerate(headers):
        lps = np.asarray(ds.ImagePositionPatient, float) + 5 * 4.0 * spec.column_direction
        np.testing.assert_allclose(affine @ [0, 5, k, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-4)
    # dcm2niix's uncorrected output holds the same voxels on an unsheared grid: its last
    # slice is off by the shear (7 steps), and it reports the tilt.
    plain = refs["1.nii"]
    ok, _, diff, error, *_ = compare_volume(data, affine, plain)
    assert not ok and diff == 0
    assert error == pytest.approx(7 * shear, abs=1e-3)
    assert "tilt" in stdout.lower() and any("Tilt" in name for name in refs)


def test_irregular_spacing_is_refused_or_resampled_like_dcm2niix(tmp_path, dask_client):
    spec = _spec("irregular")
    write_series(spec, tmp_path / "in")
    extra = [0.0, 0.0, 0.0, 1.5, 1.5, 1.5, 3.0, 3.0]  # steps 3, 3, 4.5, 3, 3, 4.5, 3 mm
    _move(tmp_path / "in", lambda k: extra[k] * spec.slice_normal)
    catalog, refs, stdout = _run_both(tmp_path / "in", tmp_path, dask_client)
    assert catalog.volumes.empty
    assert [f.code for f in catalog.failures.itertuples()] == ["irregular_spacing"]
    assert "Interslice distance varies" in stdout

    again = tmp_path / "resampled"
    again.mkdir()
    catalog, refs, _ = _run_both(tmp_path / "in", again, dask_client, resample_irregular=True)
    (row,) = catalog.volumes.itertuples()
    assert row.resampled and row.split_reason == "resampled" and row.dtype == "float32"
    assert row.slice_spacing_max_dev == pytest.approx(1.5 - 0.0, abs=1e-6)
    data, affine = _volume(row)
    assert data.shape == (9, 24, 20)  # 24 mm at the smallest step, 3 mm
    equalized = next(ref for name, ref in refs.items() if "_Eq_" in name)
    _, detail, diff, error, *_ = compare_volume(data, affine, equalized)
    assert error is not None and error < 1e-3, detail
    assert diff is not None and diff <= 0.5 + 1e-3, detail  # dcm2niix rounds to integers
