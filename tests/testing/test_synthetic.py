"""Tests for the synthetic DICOM factory: the ground truth every other test relies on.

The checks read the written files back with pydicom and recompute geometry from the raw
header values, so they do not trust the factory's own bookkeeping.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import voxlake.testing as vt
from voxlake.testing import (
    PRIVATE_CREATOR,
    SampleManifest,
    SeriesSpec,
    WrittenSeries,
    generate_sample_data,
    make_phantom,
    sample_specs,
    write_series,
)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SampleManifest:
    return generate_sample_data(tmp_path_factory.mktemp("tiny"), seed=0, profile="tiny")


def _read(ws: WrittenSeries) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in ws.files]


def _normal(ds: pydicom.Dataset) -> np.ndarray:
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    return np.cross(iop[:3], iop[3:])


def _spatially_sorted(ws: WrittenSeries) -> list[pydicom.Dataset]:
    """Headers sorted along the slice normal, computed from the headers alone."""
    return sorted(
        _read(ws), key=lambda d: float(np.array(d.ImagePositionPatient, float) @ _normal(d))
    )


@functools.cache
def _base_spec() -> SeriesSpec:
    return sample_specs(profile="tiny")[0]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_public_names_resolve() -> None:
    for name in vt.__all__:
        assert getattr(vt, name) is not None


def test_same_seed_writes_identical_bytes(tmp_path: Path) -> None:
    a = _tree_bytes(generate_sample_data(tmp_path / "a", seed=7, profile="tiny").root)
    b = _tree_bytes(generate_sample_data(tmp_path / "b", seed=7, profile="tiny").root)
    c = _tree_bytes(generate_sample_data(tmp_path / "c", seed=8, profile="tiny").root)
    assert len(a) > 50
    assert a == b
    assert a.keys() == c.keys()  # layout depends on the profile only
    differing = [k for k in a if a[k] != c[k]]
    assert len(differing) == len(a)  # every file (UIDs, pixels) and labels.csv changes


def test_pixels_stacked_in_spatial_order_equal_expected_volume(tiny: SampleManifest) -> None:
    for ws in tiny.series:
        dss = _spatially_sorted(ws)
        # The manifest's file order is spatial order too.
        assert [d.SOPInstanceUID for d in dss] == list(ws.sop_instance_uids)
        assert [Path(d.filename) for d in dss] == list(ws.files)
        stacked = np.stack(
            [
                d.pixel_array.astype(np.float64) * float(d.get("RescaleSlope", 1.0))
                + float(d.get("RescaleIntercept", 0.0))
                for d in dss
            ]
        )
        expected = ws.expected_volume()
        assert expected.shape == (ws.spec.n_slices, ws.spec.rows, ws.spec.columns)
        np.testing.assert_array_equal(stacked, expected.astype(np.float64))


def test_expected_volume_dtype_and_determinism(tiny: SampleManifest) -> None:
    for ws in tiny.series:
        expected = ws.expected_volume()
        if ws.spec.rescale_slope == 0.5:
            assert expected.dtype == np.float32
            assert np.any(expected % 1 == 0.5)  # the half steps are real, not rounded away
        else:
            assert expected.dtype == np.int16
        np.testing.assert_array_equal(expected, ws.expected_volume())
    assert any(ws.expected_volume().dtype == np.float32 for ws in tiny.series)


def test_expected_affine_matches_raw_headers(tiny: SampleManifest) -> None:
    for ws in tiny.series:
        dss = _spatially_sorted(ws)
        aff = ws.expected_affine()
        first = np.array(dss[0].ImagePositionPatient, dtype=float)
        last = np.array(dss[-1].ImagePositionPatient, dtype=float)
        iop = np.array(dss[0].ImageOrientationPatient, dtype=float)
        row_sp, col_sp = (float(v) for v in dss[0].PixelSpacing)
        # Independent computation from the header values (PS3.3 C.7.6.2.1.1).
        lps = np.eye(4)
        lps[:3, 0] = iop[:3] * col_sp
        lps[:3, 1] = iop[3:] * row_sp
        lps[:3, 2] = (last - first) / (len(dss) - 1)
        lps[:3, 3] = first
        np.testing.assert_allclose(aff, LPS_TO_RAS @ lps, atol=1e-6)
        cols = aff[:3, :3]
        gram = cols.T @ cols
        np.testing.assert_allclose(
            np.diag(gram), [col_sp**2, row_sp**2, ws.spec.slice_spacing**2], rtol=1e-9
        )
        np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-9)
        np.testing.assert_allclose(aff[:3, 3], first * [-1, -1, 1], atol=1e-9)
        np.testing.assert_array_equal(aff[3], [0, 0, 0, 1])


def test_expected_affine_agrees_with_nibabel_wrapper(tiny: SampleManifest) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel.nicom warns that it is experimental
        dicomwrappers = pytest.importorskip("nibabel.nicom.dicomwrappers")
    for ws in tiny.series:
        dss = _spatially_sorted(ws)
        ras = ws.expected_affine()
        wrappers = [dicomwrappers.wrapper_from_data(d) for d in dss]
        # nibabel indexes (row, column, slice) in LPS; its slice axis is cross(col, row).
        nib = LPS_TO_RAS @ wrappers[0].affine
        np.testing.assert_allclose(nib[:3, 0], ras[:3, 1], atol=1e-6)
        np.testing.assert_allclose(nib[:3, 1], ras[:3, 0], atol=1e-6)
        np.testing.assert_allclose(nib[:3, 3], ras[:3, 3], atol=1e-6)
        direction = -nib[:3, 2] / np.linalg.norm(nib[:3, 2])
        np.testing.assert_allclose(direction * ws.spec.slice_spacing, ras[:3, 2], atol=1e-6)
        # Its slice indicator (position along ITS normal, cross(col, row)) falls by one
        # spacing per slice: the files are in order along our normal, cross(row, col).
        indicators = np.array([w.slice_indicator for w in wrappers])
        np.testing.assert_allclose(np.diff(indicators), -ws.spec.slice_spacing, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(
    quat=st.tuples(*[st.floats(-1, 1) for _ in range(4)]).filter(
        lambda q: 0.1 < sum(x * x for x in q)
    ),
    spacing=st.tuples(*[st.floats(0.3, 6.0) for _ in range(3)]),
    origin=st.tuples(*[st.floats(-300, 300) for _ in range(3)]),
    ijk=st.tuples(st.integers(0, 31), st.integers(0, 23), st.integers(0, 9)),
)
def test_affine_maps_voxels_to_dicom_patient_positions(
    quat: tuple[float, float, float, float],
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    ijk: tuple[int, int, int],
) -> None:
    w, x, y, z = np.array(quat) / np.linalg.norm(quat)
    rot = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )
    spec = dataclasses.replace(
        _base_spec(),
        rows=24,
        columns=32,
        n_slices=10,
        pixel_spacing=spacing[:2],
        slice_spacing=spacing[2],
        orientation=(*rot[:, 0], *rot[:, 1]),
        origin=origin,
    )
    i, j, k = ijk
    # PS3.3 C.7.6.2.1.1: P = S + i * row_dir * col_spacing + j * col_dir * row_spacing.
    position = (
        spec.slice_positions()[k]
        + i * spec.row_direction * spacing[1]
        + j * spec.column_direction * spacing[0]
    )
    mapped = spec.ras_affine() @ [i, j, k, 1]
    np.testing.assert_allclose(mapped[:3], position * [-1, -1, 1], atol=1e-9)
    # (row, col, normal) is right-handed and the LPS->RAS flip of two axes keeps it so.
    np.testing.assert_allclose(np.linalg.det(spec.ras_affine()[:3, :3]), np.prod(spacing))


def test_exactly_one_oblique_series_orthonormal() -> None:
    for profile in ("tiny", "demo"):
        specs = sample_specs(profile=profile)  # type: ignore[arg-type]
        oblique = [
            s
            for s in specs
            if not np.allclose(np.abs(s.orientation), np.round(np.abs(s.orientation)))
        ]
        assert len(oblique) == 1
        spec = oblique[0]
        r, c = spec.row_direction, spec.column_direction
        assert abs(r @ c) < 1e-12
        np.testing.assert_allclose([np.linalg.norm(r), np.linalg.norm(c)], 1.0, atol=1e-12)
        angle = np.degrees(np.arccos(np.clip(spec.slice_normal[2], -1, 1)))
        assert 15 <= angle <= 25  # tilted off axial by ~23 degrees
        assert np.count_nonzero(np.abs(np.concatenate([r, c])) > 1e-9) >= 4  # not axis-aligned


def test_written_oblique_header_is_orthonormal(tiny: SampleManifest) -> None:
    obliques = [ws for ws in tiny.series if "OBLIQUE" in ws.files[0].read_bytes().decode("latin-1")]
    assert len(obliques) == 1
    iop = np.array(pydicom.dcmread(obliques[0].files[0]).ImageOrientationPatient, dtype=float)
    assert abs(iop[:3] @ iop[3:]) < 1e-12
    np.testing.assert_allclose(np.linalg.norm(iop.reshape(2, 3), axis=1), 1.0, atol=1e-12)


def test_instance_numbers_shuffled_and_reversed(tiny: SampleManifest) -> None:
    kinds = set()
    for ws in tiny.series:
        numbers = [int(d.InstanceNumber) for d in _spatially_sorted(ws)]
        assert sorted(numbers) == list(range(1, ws.spec.n_slices + 1))
        assert numbers == list(ws.instance_numbers)
        assert [f.name for f in ws.files] == [f"IM{n:04d}.dcm" for n in numbers]
        if ws.spec.shuffle_instance_numbers:
            assert numbers != sorted(numbers)
            assert numbers != sorted(numbers, reverse=True)
            kinds.add("shuffled")
        elif ws.spec.reverse_slice_direction:
            assert numbers == sorted(numbers, reverse=True)
            kinds.add("reversed")
        else:
            assert numbers == sorted(numbers)
    assert kinds == {"shuffled", "reversed"}


def test_labels_csv_matches_manifest(tiny: SampleManifest) -> None:
    with tiny.labels_csv.open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "label"]
        rows = list(reader)
    expected = [
        {
            "PatientID": ws.spec.patient_id,
            "StudyInstanceUID": ws.spec.study_instance_uid,
            "SeriesInstanceUID": ws.spec.series_instance_uid,
            "label": str(int(ws.spec.lesion)),
        }
        for ws in tiny.series
    ]
    assert rows == expected
    # The labels are keyed by what is really in the headers.
    for ws, row in zip(tiny.series, rows, strict=True):
        ds = pydicom.dcmread(ws.files[0], stop_before_pixels=True)
        assert (ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID) == (
            row["PatientID"],
            row["StudyInstanceUID"],
            row["SeriesInstanceUID"],
        )
    assert {r["label"] for r in rows} == {"0", "1"}


def test_planted_identifiers_occur_in_raw_files(tiny: SampleManifest) -> None:
    blob = b"\n".join(f.read_bytes() for ws in tiny.series for f in ws.files)
    assert len(tiny.planted_identifiers) == len(set(tiny.planted_identifiers))
    missing = [v for v in tiny.planted_identifiers if v.encode() not in blob]
    assert missing == []
    n_files = sum(len(ws.files) for ws in tiny.series)
    sop_uids = {u for ws in tiny.series for u in ws.sop_instance_uids}
    assert len(sop_uids) == n_files  # every SOPInstanceUID is unique
    assert sop_uids <= set(tiny.planted_identifiers)
    for ws in tiny.series:
        spec = ws.spec
        ds = pydicom.dcmread(ws.files[0], stop_before_pixels=True)
        for value in (spec.patient_name, spec.patient_id, spec.patient_birth_date):
            assert value in tiny.planted_identifiers
        assert spec.patient_sex not in tiny.planted_identifiers  # generic values are not
        private = ds.private_block(0x0009, PRIVATE_CREATOR)[0x01].value
        if isinstance(private, bytes):  # implicit VR: no private dictionary, read as UN
            private = private.decode("ascii").rstrip()
        assert private == spec.patient_name
        assert str(ds.PatientName) == spec.patient_name
        assert ds.InstitutionName in tiny.planted_identifiers
        assert ds.AccessionNumber in tiny.planted_identifiers


def test_bits_stored_12_values_fit(tiny: SampleManifest) -> None:
    twelve = [ws for ws in tiny.series if ws.spec.bits_stored == 12]
    assert {ws.spec.modality for ws in twelve} == {"CT", "MR"}
    for ws in twelve:
        for ds in _read(ws):
            assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
            assert ds.PixelRepresentation == 0
            arr = ds.pixel_array
            assert arr.dtype == np.uint16
            assert int(arr.max()) < 4096
            raw = np.frombuffer(ds.PixelData, dtype="<u2")
            assert int(raw.max()) < 4096  # not just masked by the reader


def test_headers_are_complete(tiny: SampleManifest) -> None:
    common = (
        "SOPClassUID SOPInstanceUID StudyInstanceUID SeriesInstanceUID FrameOfReferenceUID "
        "InstanceNumber ImagePositionPatient ImageOrientationPatient PixelSpacing "
        "SliceThickness SliceLocation Rows Columns BitsAllocated BitsStored HighBit "
        "PixelRepresentation SamplesPerPixel PhotometricInterpretation WindowCenter "
        "WindowWidth Modality Manufacturer ManufacturerModelName BodyPartExamined StudyDate "
        "SeriesDate AcquisitionDate ContentDate StudyTime SeriesTime AcquisitionTime "
        "ContentTime PatientName PatientID PatientBirthDate PatientSex PatientAge "
        "PatientAddress InstitutionName InstitutionAddress ReferringPhysicianName "
        "OperatorsName AccessionNumber StudyID SeriesNumber"
    ).split()
    ct_only = "KVP XRayTubeCurrent ConvolutionKernel RescaleSlope RescaleIntercept".split()
    mr_only = "EchoTime RepetitionTime MagneticFieldStrength FlipAngle SpacingBetweenSlices".split()
    seen = set()
    for ws in tiny.series:
        for ds in _read(ws):
            missing = [
                k for k in common + (ct_only if ds.Modality == "CT" else mr_only) if k not in ds
            ]
            assert missing == []
            assert ds.file_meta.TransferSyntaxUID == ws.spec.transfer_syntax
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.SOPClassUID == (
                pydicom.uid.CTImageStorage if ds.Modality == "CT" else pydicom.uid.MRImageStorage
            )
            assert ds.preamble == b"\x00" * 128
            if ds.Modality == "CT":
                assert ds.RescaleType == "HU"
            seen.add((ds.Modality, "RescaleSlope" in ds, str(ds.file_meta.TransferSyntaxUID)))
    # MR with and without rescale tags; implicit and explicit VR.
    assert {(m, r) for m, r, _ in seen} >= {("MR", True), ("MR", False), ("CT", True)}
    assert {t for _, _, t in seen} == {
        pydicom.uid.ExplicitVRLittleEndian,
        pydicom.uid.ImplicitVRLittleEndian,
    }


def test_write_without_preamble(tmp_path: Path) -> None:
    spec = sample_specs(profile="tiny")[2]
    ws = write_series(spec, tmp_path, seed=1, preamble=False)
    raw = ws.files[0].read_bytes()
    assert raw[128:132] != b"DICM"
    assert raw[:4] == b"\x08\x00\x05\x00"  # starts straight with (0008,0005), implicit VR
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(ws.files[0])
    ds = pydicom.dcmread(ws.files[0], force=True)
    assert ds.PatientID == spec.patient_id
    assert "TransferSyntaxUID" not in ds.get("file_meta", {})


def test_lesion_is_the_only_difference_and_is_visible() -> None:
    for spec in sample_specs(profile="tiny"):
        if not spec.lesion:
            continue
        with_lesion = make_phantom(spec, seed=5)
        without = make_phantom(dataclasses.replace(spec, lesion=False), seed=5)
        changed = with_lesion != without
        assert changed.sum() >= 3
        # Lesions sit inside the field of view, clear of the image border.
        assert not changed[:, 0, :].any()
        assert not changed[:, :, 0].any()
        if spec.modality == "CT":
            tissue = 32.0 if spec.body_part == "HEAD" else 40.0
            lesion_mean = float(with_lesion[changed].mean())
            assert tissue + 40 < lesion_mean < tissue + 110


def test_ct_phantom_has_realistic_hounsfield_units() -> None:
    chest = next(s for s in sample_specs(profile="tiny") if s.body_part == "CHEST")
    hu = make_phantom(dataclasses.replace(chest, noise_sd=0.0), seed=0)
    values = set(np.unique(hu).tolist())
    assert {-1000.0, -820.0, -100.0, 40.0, 750.0} <= values  # air, lung, fat, tissue, bone
    head = next(
        s for s in sample_specs(profile="tiny") if s.body_part == "HEAD" and s.modality == "CT"
    )
    hu = make_phantom(dataclasses.replace(head, noise_sd=0.0), seed=0)
    assert {-1000.0, 1150.0, 36.0, 28.0} <= set(np.unique(hu).tolist())
    noisy = make_phantom(chest, seed=0)
    air = noisy[hu.shape[0] // 2, :2, :2]  # corners are outside the body
    assert np.all(np.abs(air + 1000) < 6 * chest.noise_sd)


def test_demo_profile_matches_brief() -> None:
    specs = sample_specs(profile="demo")
    ct = [s for s in specs if s.modality == "CT"]
    mr = [s for s in specs if s.modality == "MR"]
    assert len({s.patient_id for s in specs}) == 8
    assert 12 <= len(specs) <= 14
    assert [(s.rows, s.columns) for s in ct].count((512, 512)) == 1
    assert all((s.rows, s.columns) in ((256, 256), (512, 512)) for s in ct)
    assert all(40 <= s.n_slices <= 120 for s in ct)
    assert all(0.6 <= p <= 0.9 for s in specs for p in s.pixel_spacing)
    assert all(1.0 <= s.slice_spacing <= 5.0 for s in specs)
    assert any(s.rescale_slope == 0.5 for s in ct)
    assert any(s.pixel_representation == 0 and s.bits_stored == 12 for s in ct)
    assert any(s.shuffle_instance_numbers for s in specs)
    assert mr
    assert all(s.pixel_representation == 0 for s in mr)
    assert len({s.manufacturer for s in specs}) >= 3
    n_lesion = sum(s.lesion for s in specs)
    assert abs(2 * n_lesion - len(specs)) <= 1
    megabytes = sum(2 * s.rows * s.columns * s.n_slices for s in specs) / 1e6
    assert 100 <= megabytes <= 250
    assert len({s.series_instance_uid for s in specs}) == len(specs)


def test_tiny_profile_has_every_kind() -> None:
    specs = sample_specs(profile="tiny")
    assert 6 <= len(specs) <= 8
    assert len({s.patient_id for s in specs}) == 4
    assert all(32 <= min(s.rows, s.columns) and max(s.rows, s.columns) <= 64 for s in specs)
    assert all(6 <= s.n_slices <= 16 for s in specs)
    assert any(s.rescale_slope == 0.5 for s in specs)
    assert any(s.shuffle_instance_numbers for s in specs)
    assert any(s.modality == "MR" for s in specs)
    assert any(s.modality == "CT" and s.pixel_representation == 0 for s in specs)
    assert any(s.rows != s.columns for s in specs)
    assert any(s.pixel_spacing[0] != s.pixel_spacing[1] for s in specs)
    assert any(s.slice_normal[2] < 0 for s in specs)  # feet-first: normal points inferior


def test_specs_depend_on_seed_only() -> None:
    assert sample_specs(seed=3, profile="tiny") == sample_specs(seed=3, profile="tiny")
    a, b = sample_specs(seed=3, profile="tiny"), sample_specs(seed=4, profile="tiny")
    assert {s.series_instance_uid for s in a}.isdisjoint(s.series_instance_uid for s in b)
    assert {s.patient_name for s in a} != {s.patient_name for s in b}


def test_spec_rejects_bad_geometry() -> None:
    spec = sample_specs(profile="tiny")[0]
    with pytest.raises(ValueError, match="orthonormal"):
        dataclasses.replace(spec, orientation=(1.0, 0.0, 0.0, 0.1, 1.0, 0.0))
    with pytest.raises(ValueError, match="modality"):
        dataclasses.replace(spec, modality="US")
    with pytest.raises(ValueError, match="YYYYMMDD"):
        dataclasses.replace(spec, study_date="2020-01-01")
