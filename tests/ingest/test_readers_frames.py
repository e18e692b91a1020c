"""frame_columns(): per-frame facts from functional groups and vendor private tags."""

from __future__ import annotations

import json

import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence

from voxlake.ingest.frames import frame_columns


def _item(**sequences: Dataset) -> Dataset:
    item = Dataset()
    for keyword, inner in sequences.items():
        setattr(item, keyword, Sequence([inner]))
    return item


def _ds(**values) -> Dataset:
    ds = Dataset()
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def enhanced(n: int = 3, per_frame_count: int | None = None) -> Dataset:
    ds = _ds(Manufacturer="TEST", NumberOfFrames=n, Rows=4, Columns=5)
    shared = _item(
        PlaneOrientationSequence=_ds(ImageOrientationPatient=[1, 0, 0, 0, 1, 0]),
        PixelMeasuresSequence=_ds(PixelSpacing=[0.5, 0.6], SliceThickness=2),
        PixelValueTransformationSequence=_ds(RescaleSlope=2, RescaleIntercept=-10),
    )
    frames = []
    for k in range(per_frame_count if per_frame_count is not None else n):
        frame = _item(
            PlanePositionSequence=_ds(ImagePositionPatient=[0, 0, 2 * k]),
            FrameContentSequence=_ds(
                DimensionIndexValues=k + 1,  # VM 1: a plain int, not a list
                StackID="1",
                InStackPositionNumber=k + 1,
                FrameAcquisitionDateTime=f"2020010112000{k}.5",
            ),
            MRDiffusionSequence=_ds(
                DiffusionBValue=1000.0,
                DiffusionDirectionality="DIRECTIONAL",
                DiffusionGradientDirectionSequence=Sequence(
                    [_ds(DiffusionGradientOrientation=[0.0, 0.6, 0.8])]
                ),
            ),
            MRImageFrameTypeSequence=_ds(
                FrameType=["ORIGINAL", "PRIMARY", "T2", "NONE"], ComplexImageComponent="PHASE"
            ),
        )
        if k == 1:  # a per-frame macro wins over the shared one
            frame.PixelValueTransformationSequence = Sequence(
                [_ds(RescaleSlope=3, RescaleIntercept=0)]
            )
        frames.append(frame)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    return ds


def test_enhanced_frames_merge_shared_and_per_frame_groups():
    out = frame_columns(enhanced())
    assert out["layout"] == "enhanced" and out["mosaic_tiles"] is None
    frames = json.loads(out["frames_json"])["frames"]
    assert [f["position"] for f in frames] == [[0, 0, 0], [0, 0, 2], [0, 0, 4]]
    assert all(f["orientation"] == [1, 0, 0, 0, 1, 0] for f in frames)
    assert [(f["slope"], f["intercept"]) for f in frames] == [(2, -10), (3, 0), (2, -10)]
    assert [f["dim"] for f in frames] == [[1], [2], [3]]
    assert [f["time"] for f in frames] == [0.0, 1.0, 2.0]  # relative seconds, no dates
    assert {f["kind"] for f in frames} == {"P"}
    assert frames[0]["b_value"] == 1000.0 and frames[0]["b_vector"] == [0.0, 0.6, 0.8]
    assert "2020" not in out["frames_json"]


def test_functional_groups_that_do_not_match_the_frame_count_are_flagged():
    out = frame_columns(enhanced(n=3, per_frame_count=2))
    assert json.loads(out["frames_json"])["error"] == "bad_functional_groups"


def test_legacy_multiframe_without_groups_is_flagged():
    out = frame_columns(_ds(Manufacturer="TEST", NumberOfFrames=12, Modality="NM"))
    assert out["layout"] == "multiframe"
    assert json.loads(out["frames_json"])["error"] == "multiframe_geometry_unknown"


@pytest.mark.parametrize("with_creator", [True, False])
def test_ge_b_value_is_read_with_or_without_its_private_creator(with_creator):
    ds = _ds(Manufacturer="GE MEDICAL SYSTEMS")
    if with_creator:
        ds.add_new((0x0043, 0x0010), "LO", "GEMS_PARM_01")
    ds.add_new((0x0043, 0x1039), "IS", [1000000001000, 8, 0, 0])
    out = frame_columns(ds)
    assert out["b_value"] == 1000.0 and out["b_vector"] is None and out["layout"] == "classic"


def test_private_tags_of_another_creator_are_never_read():
    ds = _ds(Manufacturer="GE MEDICAL SYSTEMS")
    ds.add_new((0x0043, 0x0010), "LO", "SOMEONE ELSE")
    ds.add_new((0x0043, 0x1039), "IS", [1000, 8, 0, 0])
    assert frame_columns(ds)["b_value"] is None


def test_philips_classic_scale_slope_and_diffusion():
    ds = _ds(Manufacturer="Philips Medical Systems")
    ds.add_new((0x2001, 0x0010), "LO", "Philips Imaging DD 001")
    ds.add_new((0x2001, 0x1003), "FL", 800.0)
    ds.add_new((0x2005, 0x0010), "LO", "Philips MR Imaging DD 001")
    ds.add_new((0x2005, 0x100E), "FL", 0.25)
    for element, value in ((0x10B0, 1.0), (0x10B1, 0.0), (0x10B2, 0.0)):
        ds.add_new((0x2005, element), "FL", value)
    out = frame_columns(ds)
    assert out["philips_scale_slope"] == 0.25
    assert out["b_value"] == 800.0 and out["b_vector"] == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("name", ["dcm_qa_nih", "dcm_qa_ct", "icometrix_dicom2nifti"])
def test_classic_frame_columns_do_not_read_the_elements_said_unread(name: str) -> None:
    """The header pass reuses a classic image's frame columns for the next file of its
    series when only CLASSIC_UNREAD elements differ: deleting them all from real images
    (diffusion, Philips, GE, Siemens) must leave the columns as they were."""
    from pathlib import Path

    from voxlake.ingest.dicom_bytes import parse_dicom_bytes
    from voxlake.ingest.frames import CLASSIC_UNREAD

    from ..conftest import require_shared_data

    root: Path = require_shared_data(name)
    checked = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds, _ = parse_dicom_bytes(path.read_bytes(), max_bytes=1 << 30)
        except Exception:
            continue  # not DICOM (the references beside the inputs)
        expected = frame_columns(ds)
        if expected["layout"] != "classic":
            continue
        present = [tag for tag in CLASSIC_UNREAD if tag in ds]
        for tag in present:
            del ds[tag]
        assert frame_columns(ds) == expected, path
        checked += bool(present)
    assert checked > 10
