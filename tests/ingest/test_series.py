"""The series planner is a pure function: test it on hand-built instance rows."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxlake.ingest.series import plan_volumes


def rows(
    positions,
    *,
    series="s1",
    iop=(1, 0, 0, 0, 1, 0),
    spacing=(0.5, 0.7),
    shape=(4, 5),
    instance_numbers=None,
    extra=None,
):
    out = []
    for n, pos in enumerate(positions):
        row = {
            "url": f"/data/{series}/{n:04d}.dcm",
            "content_hash": f"h{series}{n}",
            "patient_key": "p",
            "study_key": "st",
            "series_key": series,
            "instance_key": f"i{series}{n}",
            "has_pixels": True,
            "file_format": "dicom",
            "modality": "CT",
            "image_orientation_patient": list(iop),
            "image_position_patient": list(pos),
            "pixel_spacing": list(spacing),
            "rows": shape[0],
            "columns": shape[1],
            "number_of_frames": None,
            "samples_per_pixel": 1,
            "bits_allocated": 16,
            "bits_stored": 12,
            "pixel_representation": 1,
            "rescale_slope": 1.0,
            "rescale_intercept": -1024.0,
            "rescale_type": None,
            "echo_numbers": None,
            "acquisition_number": None,
            "temporal_position_identifier": None,
            "instance_number": (instance_numbers or list(range(1, len(positions) + 1)))[n],
            "image_type": ["ORIGINAL", "PRIMARY", "AXIAL"],
        }
        row.update((extra or {}).get(n, {}))
        out.append(row)
    return pd.DataFrame(out)


def codes(failures):
    return [f.error.code for f in failures]


def test_sorts_along_normal_not_instance_number():
    z = [10.0, 0.0, 5.0, 2.5, 7.5]
    plans, failures = plan_volumes(rows([(0, 0, v) for v in z], instance_numbers=[1, 2, 3, 4, 5]))
    assert failures == []
    (plan,) = plans
    order = [int(s.url[-8:-4]) for s in plan.slices]
    assert [z[i] for i in order] == sorted(z)
    affine = np.array(plan.affine).reshape(4, 4)
    np.testing.assert_allclose(affine[:3, 2], [0, 0, 2.5])
    np.testing.assert_allclose(affine[:3, 3], [0, 0, 0])
    np.testing.assert_allclose(affine[:3, 0], [-0.7, 0, 0])  # column spacing, L->R flip
    np.testing.assert_allclose(affine[:3, 1], [0, -0.5, 0])
    assert plan.shape == (5, 4, 5) and plan.dtype == "int16" and plan.units == "HU"


@settings(max_examples=60, deadline=None)
@given(
    angles=st.tuples(*(st.floats(-math.pi, math.pi) for _ in range(3))),
    n=st.integers(2, 12),
    step=st.floats(0.3, 6.0),
    origin=st.tuples(*(st.floats(-300, 300) for _ in range(3))),
    seed=st.integers(0, 2**16),
)
def test_affine_maps_voxels_to_patient_positions(angles, n, step, origin, seed):
    """Property: voxel (i, j, k) lands where DICOM PS3.3 C.7.6.2.1 puts it (in RAS)."""
    a, b, c = angles
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx = np.array([[1, 0, 0], [0, math.cos(c), -math.sin(c)], [0, math.sin(c), math.cos(c)]])
    rot = rz @ ry @ rx
    row_dir, col_dir = rot[:, 0], rot[:, 1]
    normal = np.cross(row_dir, col_dir)
    spacing = (0.8, 0.6)  # (row spacing, column spacing)
    positions = [np.array(origin) + k * step * normal for k in range(n)]
    order = np.random.default_rng(seed).permutation(n)
    frame = rows([positions[k] for k in order], iop=(*row_dir, *col_dir), spacing=spacing)
    plans, failures = plan_volumes(frame)
    assert failures == []
    affine = np.array(plans[0].affine).reshape(4, 4)
    lps_to_ras = np.diag([-1, -1, 1])
    for i, j, k in [(0, 0, 0), (3, 2, n - 1), (1, 3, n // 2)]:
        lps = positions[k] + i * spacing[1] * row_dir + j * spacing[0] * col_dir
        np.testing.assert_allclose(affine @ [i, j, k, 1], [*(lps_to_ras @ lps), 1], atol=1e-6)


def test_repeated_positions_make_4d_in_temporal_order():
    positions = [(0, 0, z) for t in range(3) for z in (0.0, 2.0, 4.0)]
    extra = {n: {"temporal_position_identifier": 3 - n // 3} for n in range(9)}
    plans, failures = plan_volumes(rows(positions, extra=extra))
    assert failures == []
    (plan,) = plans
    assert plan.shape == (3, 3, 4, 5)
    # t-major: the first three slices belong to temporal position 1 (files 6, 7, 8).
    assert [int(s.url[-8:-4]) for s in plan.slices[:3]] == [6, 7, 8]


@pytest.mark.parametrize(
    ("z", "code"),
    [
        ([0.0, 2.0, 4.0, 8.0, 10.0], "missing_slice"),
        ([0.0, 2.0, 4.0, 5.0, 7.0], "irregular_spacing"),
        ([0.0, 2.0, 2.0, 4.0], "duplicate_position"),
        ([3.0], "single_slice"),
    ],
)
def test_refuses_wrong_geometry_with_precise_codes(z, code):
    plans, failures = plan_volumes(rows([(0, 0, v) for v in z]))
    assert plans == [] and codes(failures) == [code]


def test_splits_by_orientation_and_echo_and_records_reason():
    axial = rows([(0, 0, z) for z in (0.0, 1.0, 2.0)], series="s")
    coronal = rows([(0, y, 0) for y in (0.0, 1.0, 2.0)], series="s", iop=(1, 0, 0, 0, 0, -1))
    coronal["url"] += "c"
    coronal["instance_key"] += "c"
    plans, failures = plan_volumes(pd.concat([axial, coronal], ignore_index=True))
    assert failures == [] and len(plans) == 2
    assert {p.split_reason for p in plans} == {"orientation"}
    assert len({p.volume_id for p in plans}) == 2
    echo = rows(
        [(0, 0, z) for z in (0.0, 1.0, 2.0) * 2],
        series="e",
        extra={n: {"echo_numbers": 1 + n // 3} for n in range(6)},
    )
    plans, failures = plan_volumes(echo)
    assert failures == [] and len(plans) == 2 and plans[0].split_reason == "echo"


def test_bad_geometry_values_are_refused():
    bad_iop = rows([(0, 0, z) for z in (0.0, 1.0)], iop=(1, 0, 0, 0.5, 1, 0))
    assert codes(plan_volumes(bad_iop)[1]) == ["bad_orientation"]
    zero_spacing = rows([(0, 0, z) for z in (0.0, 1.0)], spacing=(0.0, 1.0))
    assert codes(plan_volumes(zero_spacing)[1]) == ["bad_pixel_spacing"]
    nan_spacing = rows([(0, 0, z) for z in (0.0, 1.0)], spacing=(float("nan"), 1.0))
    assert codes(plan_volumes(nan_spacing)[1]) == ["bad_pixel_spacing"]
    no_position = rows([(0, 0, z) for z in (0.0, 1.0)])
    no_position.at[1, "image_position_patient"] = None
    assert codes(plan_volumes(no_position)[1]) == ["missing_geometry"]


def test_duplicate_sop_instance_with_different_content_is_refused():
    frame = rows([(0, 0, z) for z in (0.0, 1.0, 2.0)])
    copy = frame.iloc[[1]].assign(url="/elsewhere/x.dcm", content_hash="other")
    assert codes(plan_volumes(pd.concat([frame, copy]))[1]) == ["duplicate_sop_instance"]
    same = frame.iloc[[1]].assign(url="/elsewhere/x.dcm")  # identical bytes: counted once
    plans, failures = plan_volumes(pd.concat([frame, same]))
    assert failures == [] and plans[0].shape[0] == 3


def test_gantry_tilt_keeps_exact_sheared_geometry():
    tilt = math.radians(15)
    positions = [(0, k * 2.0 * math.sin(tilt), k * 2.0 * math.cos(tilt)) for k in range(5)]
    plans, failures = plan_volumes(rows(positions))
    assert failures == []
    plan = plans[0]
    assert plan.geometry["gantry_tilt_deg"] == pytest.approx(15, abs=1e-6)
    affine = np.array(plan.affine).reshape(4, 4)
    np.testing.assert_allclose(affine @ [0, 0, 4, 1], [0, -positions[4][1], positions[4][2], 1])


def test_revision_changes_with_content_and_is_stable_otherwise():
    frame = rows([(0, 0, z) for z in (0.0, 1.0, 2.0)])
    first = plan_volumes(frame)[0][0]
    again = plan_volumes(frame.sample(frac=1, random_state=3))[0][0]
    assert (first.volume_id, first.revision) == (again.volume_id, again.revision)
    changed = frame.copy()
    changed.loc[1, "content_hash"] = "new"
    assert plan_volumes(changed)[0][0].revision != first.revision


def test_dtype_rules():
    frame = rows([(0, 0, z) for z in (0.0, 1.0)])
    assert plan_volumes(frame)[0][0].dtype == "int16"
    half = frame.assign(rescale_slope=0.5)
    assert plan_volumes(half)[0][0].dtype == "float32"
    wide = frame.assign(bits_stored=16)  # declared range overflows int16 after -1024
    plan = plan_volumes(wide)[0][0]
    assert (plan.dtype, plan.wider_dtype) == ("int16", "int32")
    mr = frame.assign(
        modality="MR",
        rescale_slope=None,
        rescale_intercept=None,
        pixel_representation=0,
        bits_stored=16,
    )
    assert plan_volumes(mr)[0][0].dtype == "uint16"


def test_plans_stream_series_by_series_in_plan_volumes_order(monkeypatch):
    """The ingest driver submits each volume as soon as its series is planned: the
    iterator gives what plan_volumes gives, in order, planning one series per step."""
    from voxlake.ingest import series as series_module
    from voxlake.ingest.series import iter_volume_plans

    frame = pd.concat(
        [
            rows([(0, 0, z) for z in range(4)], series="a"),
            rows([(0, 0, 0), (0, 0, 0), (0, 0, 3)], series="b"),  # duplicate_position
            rows([(0, 0, 2 * z) for z in range(5)], series="c"),
        ]
    )
    plans, failures = plan_volumes(frame, max_voxels=10**6)
    streamed = list(iter_volume_plans(frame, max_voxels=10**6))

    def ident(result):  # plans hold NaN metadata: compare what identifies them
        if hasattr(result, "revision"):
            return (result.volume_id, result.revision)
        return (result.subject, result.error.code)

    assert codes(failures) == ["duplicate_position"] and len(plans) == 2
    # Series in key order (a, b, c): plan, failure, plan.
    assert [ident(r) for r in streamed] == [ident(plans[0]), ident(failures[0]), ident(plans[1])]
    planned: list[str] = []
    real = series_module._plan_series

    def counted(key, *args, **kwargs):
        planned.append(key)
        return real(key, *args, **kwargs)

    monkeypatch.setattr(series_module, "_plan_series", counted)
    first = next(iter_volume_plans(frame))
    assert planned == ["a"] and first.series_key == "a"  # one series planned, not three
