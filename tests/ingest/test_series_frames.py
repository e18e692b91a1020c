"""The planner on multi-frame, mosaic, diffusion, multi-echo and irregular inputs (pure)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from voxlake.ingest.series import plan_volumes

from .test_series import codes, rows


def enhanced(frames, *, series="mf", extra=None, instance="i0"):
    """One enhanced multi-frame instance row carrying ``frames`` (frames_json objects)."""
    frame = rows([(0, 0, 0)], series=series, extra={0: extra or {}})
    frame["layout"] = "enhanced"
    frame["number_of_frames"] = len(frames)
    frame["instance_key"] = instance
    frame["url"] = f"/data/{instance}.dcm"
    frame["content_hash"] = f"h{instance}"
    frame["frames_json"] = json.dumps({"v": 1, "frames": frames})
    return frame


def test_enhanced_frames_become_a_4d_volume_ordered_by_dimension_index():
    # 3 positions x 2 timepoints, written in a scrambled frame order.
    layout = [(z, t) for t in range(2) for z in range(3)]
    order = [4, 0, 5, 2, 1, 3]
    frames = [
        {
            "position": [0, 0, 2.0 * layout[i][0]],
            "dim": [1, layout[i][0] + 1, layout[i][1] + 1],
            "slope": 2.0,
            "intercept": -1.0,
            "b_value": [0.0, 1000.0][layout[i][1]],
            "b_vector": [None, [0, 0.6, 0.8]][layout[i][1]],
        }
        for i in order
    ]
    plans, failures = plan_volumes(enhanced(frames))
    assert failures == []
    (plan,) = plans
    assert plan.shape == (2, 3, 4, 5) and plan.layout == "enhanced"
    expected = [order.index(layout.index((z, t))) for t in range(2) for z in range(3)]
    assert [s.frame for s in plan.slices] == expected
    assert {s.slope for s in plan.slices} == {2.0} and plan.dtype == "int16"
    assert plan.metadata["b_values"] == [0.0, 1000.0]
    np.testing.assert_allclose(plan.metadata["b_vectors_patient"], [0, 0, 0, 0, 0.6, 0.8])
    # Axial: image axes (i, j, k) are L, P, S in LPS terms, so the components are unchanged.
    np.testing.assert_allclose(plan.metadata["b_vectors_image"], [0, 0, 0, 0, 0.6, 0.8])
    np.testing.assert_allclose(np.array(plan.affine).reshape(4, 4)[:3, 2], [0, 0, 2])


def test_timepoints_that_disagree_across_slices_are_refused():
    frames = [
        {"position": [0, 0, z], "b_value": b, "dim": [1, z + 1, t]}
        for z in range(3)
        for t, b in enumerate([0.0, 1000.0] if z != 1 else [1000.0, 0.0])
    ]
    plans, failures = plan_volumes(enhanced(frames))
    assert plans == [] and codes(failures) == ["ambiguous_timepoints"]


def test_mosaic_tiles_are_sorted_along_the_normal_even_when_stored_reversed():
    # Tiles stored from the top slice down (the "descending" Siemens order).
    tiles = [{"position": [0, 0, 4.0 - 2.0 * k]} for k in range(3)]
    frame = rows([(0, 0, 0)], shape=(12, 15))
    frame["layout"] = "mosaic"
    frame["frames_json"] = json.dumps(
        {"v": 1, "frames": tiles, "mosaic": {"grid": 3, "tile_rows": 4, "tile_columns": 5}}
    )
    (plan,), failures = plan_volumes(frame)
    assert failures == [] and plan.shape == (3, 4, 5)
    assert [s.frame for s in plan.slices] == [2, 1, 0]
    assert {s.mosaic_grid for s in plan.slices} == {3}
    np.testing.assert_allclose(np.array(plan.affine).reshape(4, 4)[:3, 3], [0, 0, 0])


@pytest.mark.parametrize(
    "code", ["mosaic_tiles_unknown", "bad_functional_groups", "multiframe_geometry_unknown"]
)
def test_frame_description_errors_fail_the_series_with_their_code(code):
    frame = rows([(0, 0, 0)])
    frame["frames_json"] = json.dumps({"v": 1, "error": code})
    plans, failures = plan_volumes(frame)
    assert plans == [] and codes(failures) == [code]


def test_series_number_and_echo_time_split_a_series():
    z = (0.0, 1.0, 2.0)
    first = rows(
        [(0, 0, v) for v in z], series="s", extra={n: {"series_number": 1} for n in range(3)}
    )
    second = rows(
        [(0, 0, v) for v in z], series="s", extra={n: {"series_number": 2} for n in range(3)}
    )
    second["instance_key"] += "b"
    second["url"] += "b"
    plans, failures = plan_volumes(pd.concat([first, second], ignore_index=True))
    assert failures == [] and len(plans) == 2
    assert {p.split_reason for p in plans} == {"series_number"}
    echoes = rows(
        [(0, 0, v) for v in z * 2],
        series="e",
        extra={n: {"echo_time": [5.0, 10.0][n // 3]} for n in range(6)},
    )
    plans, failures = plan_volumes(echoes)
    assert failures == [] and len(plans) == 2 and plans[0].split_reason == "echo_time"
    assert sorted(p.metadata["echo_times"][0] for p in plans) == [5.0, 10.0]


def test_philips_precise_scaling_uses_the_private_scale_slope():
    frames = [
        {"position": [0, 0, z], "slope": 1.5, "intercept": 3.0, "philips_scale_slope": 0.25}
        for z in (0.0, 1.0)
    ]
    instance = enhanced(frames, extra={"manufacturer": "Philips", "modality": "MR"})
    (display,), _ = plan_volumes(instance)
    assert {(s.slope, s.intercept) for s in display.slices} == {(1.5, 3.0)}
    assert display.metadata["value_scaling"] == "rescale"
    (precise,), _ = plan_volumes(instance, philips_scaling="precise")
    # FP = (PV * RS + RI) / (RS * SS): slope 1 / SS, intercept RI / (RS * SS).
    assert {(s.slope, s.intercept) for s in precise.slices} == {(4.0, 8.0)}
    assert precise.metadata["value_scaling"] == "philips_precise"
    assert precise.volume_id == display.volume_id and precise.revision != display.revision


def test_irregular_spacing_is_refused_or_resampled_when_configured():
    z = [0.0, 2.0, 4.0, 7.0, 9.0]
    plans, failures = plan_volumes(rows([(0, 0, v) for v in z]))
    assert plans == [] and codes(failures) == ["irregular_spacing"]
    assert "2.000 to 3.000 mm" in failures[0].error.message
    (plan,), failures = plan_volumes(rows([(0, 0, v) for v in z]), resample_irregular=True)
    assert failures == []
    assert plan.resample == ((0.0, 2.0, 4.0, 7.0, 9.0), 2.0)
    assert plan.shape == (5, 4, 5) and plan.source_shape == (5, 4, 5)
    assert plan.dtype == "float32" and plan.metadata["resampled"] is True
    assert plan.split_key == "resampled" and plan.split_reason == "resampled"
    assert plan.geometry["slice_spacing_max_dev"] == pytest.approx(1.0)
    np.testing.assert_allclose(np.array(plan.affine).reshape(4, 4)[:3, 2], [0, 0, 2])
    # A missing slice is never interpolated over, even when resampling is allowed.
    gap = [0.0, 2.0, 4.0, 8.0, 10.0]
    plans, failures = plan_volumes(rows([(0, 0, v) for v in gap]), resample_irregular=True)
    assert plans == [] and codes(failures) == ["missing_slice"]


def test_positions_off_one_line_are_refused():
    positions = [(0, 0, 0.0), (0, 0, 1.0), (0, 5, 2.0), (0, 0, 3.0)]
    plans, failures = plan_volumes(rows(positions))
    assert plans == [] and codes(failures) == ["nonlinear_stack"]


def test_tilt_with_oblique_orientation_reports_the_angle():
    tilt = math.radians(20)
    positions = [(0, k * 1.5 * math.sin(tilt), k * 1.5 * math.cos(tilt)) for k in range(4)]
    (plan,), failures = plan_volumes(rows(positions))
    assert failures == [] and plan.geometry["gantry_tilt_deg"] == pytest.approx(20, abs=1e-6)
    assert plan.spacing[0] == pytest.approx(1.5)


def test_image_files_plan_with_their_own_affine():
    affine = np.array([[0, 0, 2, -10], [0, 3, 0, -20], [-1, 0, 0, 30], [0, 0, 0, 1]], float)
    row = {
        "url": "/data/a.nii.gz",
        "content_hash": "h",
        "series_key": "k",
        "instance_key": "i",
        "has_pixels": True,
        "file_format": "nifti",
        "array_shape": [7, 6, 5, 2],
        "array_affine": affine.ravel().tolist(),
        "array_dtype": "int16",
        "samples_per_pixel": 1,
        "rescale_slope": 1.0,
        "rescale_intercept": 0.0,
        "rescale_type": None,
    }
    (plan,), failures = plan_volumes(pd.DataFrame([row]))
    assert failures == [] and plan.shape == (2, 5, 6, 7) and plan.layout == "nifti"
    np.testing.assert_allclose(np.array(plan.affine).reshape(4, 4), affine)
    assert plan.spacing == (2.0, 3.0, 1.0)
    colour = pd.DataFrame([{**row, "array_dtype": "structured", "samples_per_pixel": 3}])
    assert codes(plan_volumes(colour)[1]) == ["color_unsupported"]  # fields not all uint8
    rgb = {**row, "array_shape": [7, 6, 5], "array_dtype": "uint8", "samples_per_pixel": 3}
    (plan,), _ = plan_volumes(pd.DataFrame([rgb]))
    assert plan.shape == (3, 5, 6, 7) and plan.dims == "czyx" and plan.dtype == "uint8"
    rgb_4d = pd.DataFrame([{**rgb, "array_shape": [7, 6, 5, 2]}])
    assert codes(plan_volumes(rgb_4d)[1]) == ["color_unsupported"]
    five = pd.DataFrame([{**row, "array_shape": [7, 6, 5, 2, 3]}])
    assert codes(plan_volumes(five)[1]) == ["unsupported_dimensions"]


def test_acquisitions_that_change_geometry_become_separate_volumes():
    # Two acquisitions in one series, overlapping in z: as one stack the positions repeat
    # unevenly; each acquisition alone is a regular stack.
    z = [0.0, 2.0, 4.0, 6.0, 3.0, 5.0, 7.0]
    extra = {n: {"acquisition_number": 1 if n < 4 else 2} for n in range(7)}
    plans, failures = plan_volumes(rows([(0, 0, v) for v in z], extra=extra))
    assert failures == [] and len(plans) == 2
    assert {p.split_reason for p in plans} == {"acquisition"}
    assert sorted(p.shape[0] for p in plans) == [3, 4]
    # When an acquisition cannot stack either, the whole part keeps its precise failure
    # (here: 0, 2, 3, 4, 5, 6, 9 mm is a regular 1 mm stack with slices missing).
    z[-1] = 9.0
    plans, failures = plan_volumes(rows([(0, 0, v) for v in z], extra=extra))
    assert plans == [] and codes(failures) == ["missing_slice"]


def test_temporal_positions_with_a_moving_table_become_separate_volumes():
    z = [0.0, 2.0, 4.0, 10.0, 12.0, 14.0]  # the table moved between time points
    extra = {n: {"temporal_position_identifier": 1 + n // 3} for n in range(6)}
    plans, failures = plan_volumes(rows([(0, 0, v) for v in z], extra=extra))
    assert failures == [] and len(plans) == 2
    assert {p.split_reason for p in plans} == {"temporal_position"}
    assert sorted(p.split_key for p in plans) == ["temporal_position=1", "temporal_position=2"]


def _colour(photometric, samples, positions, **extra):
    frame = rows(positions, series="c")
    frame["photometric_interpretation"] = photometric
    frame["samples_per_pixel"] = samples
    frame["bits_allocated"] = frame["bits_stored"] = extra.pop("bits", 8)
    frame["pixel_representation"] = 0
    for key, value in extra.items():
        frame[key] = value
    return frame


@pytest.mark.parametrize(
    ("photometric", "samples", "bits", "dtype"),
    [
        ("RGB", 3, 8, "uint8"),
        ("YBR_FULL_422", 3, 8, "uint8"),
        ("RGB", 3, 16, "uint16"),
        ("PALETTE COLOR", 1, 8, "uint16"),  # LUT entries may be 16-bit
    ],
)
def test_colour_series_plan_channels_first_without_rescale(photometric, samples, bits, dtype):
    positions = [(0, 0, 2.0 * z) for z in range(3)]
    plans, failures = plan_volumes(_colour(photometric, samples, positions, bits=bits))
    assert failures == []
    (plan,) = plans
    assert plan.shape == (3, 3, 4, 5) and plan.dims == "czyx" and plan.dtype == dtype
    # One source frame per slice (never per channel); no CT rescale applied to colour.
    assert len(plan.slices) == 3 and {(s.slope, s.intercept) for s in plan.slices} == {(1, 0)}
    assert plan.metadata["value_scaling"] == "none"
    np.testing.assert_allclose(np.array(plan.affine).reshape(4, 4)[:3, 2], [0, 0, 2])


def test_colour_kinds_not_stored_are_refused():
    positions = [(0, 0, 2.0 * z) for z in range(3)]
    assert codes(plan_volumes(_colour("CMYK", 4, positions))[1]) == ["color_unsupported"]
    assert codes(plan_volumes(_colour("RGB", 2, positions))[1]) == ["color_unsupported"]
    # Colour and time (each position twice, by temporal position): 4D colour is refused.
    twice = _colour("RGB", 3, positions + positions)
    twice["temporal_position_identifier"] = [1, 1, 1, 2, 2, 2]
    assert codes(plan_volumes(twice)[1]) == ["color_unsupported"]
    # Greyscale and colour frames of one series never share an array.
    mixed = pd.concat([rows(positions, series="c"), _colour("RGB", 3, positions)])
    mixed["url"] = [f"/data/{n}.dcm" for n in range(6)]
    mixed["instance_key"] = [f"i{n}" for n in range(6)]
    mixed["content_hash"] = [f"h{n}" for n in range(6)]
    plans, failures = plan_volumes(mixed)
    assert failures == [] and sorted(p.dims for p in plans) == ["czyx", "zyx"]


def test_explode_frames_reads_only_the_columns_it_lists():
    """explode_frames lists only the columns it reads (the others are costly to list): a
    column the frame table reads but does not list would come back as None."""
    from voxlake.ingest import frame_table

    read: set[str] = set()

    class Recording(dict):
        def get(self, key, default=None):
            read.add(key)
            return super().get(key, default)

        def __getitem__(self, key):
            read.add(key)
            return super().__getitem__(key)

    series = rows([(0.0, 0.0, float(z)) for z in range(4)])
    frame_table._base(Recording(series.iloc[0].to_dict()))
    assert "image_position_patient" in read
    assert read <= set(frame_table._READ_COLUMNS)
    frames = frame_table.explode_frames(series)
    assert [f.position for f in frames] == [tuple(p) for p in series["image_position_patient"]]
