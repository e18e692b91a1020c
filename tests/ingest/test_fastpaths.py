"""The header pass and the volume stage's fast paths give exactly what the pydicom paths give.

Each fast path is compared with the straightforward implementation it replaced, on real
files of every transfer syntax in ``dcm_qa_ts`` and on the synthetic sample.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.config import IGNORE
from pydicom.dataelem import DataElement, RawDataElement

from voxlake.catalog.schema import DICOM_COLUMNS
from voxlake.config import DeidConfig
from voxlake.ingest import deid, header_json
from voxlake.ingest.deid import Pseudonymizer, deidentify
from voxlake.ingest.dicom_bytes import parse_dicom_bytes
from voxlake.ingest.header_json import header_to_json
from voxlake.ingest.headers import _convert, typed_columns
from voxlake.ingest.readers.dicom import _Overflow, _rescale

from ..conftest import SECRET, require_shared_data


def parsed_files(
    tiny_sample: Path, shared: dict[str, int], sample_files: int
) -> list[tuple[Path, Any]]:
    """``(path, dataset)`` of every `step`-th file of each ``shared`` data set (name: step)
    and of the first `sample_files` files of the tiny sample, where pydicom parses them."""
    paths: list[Path] = []
    for name, step in shared.items():
        root = require_shared_data(name)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() != ".md")
        paths += files[::step]
    paths += sorted(Path(tiny_sample.root).rglob("*.dcm"))[:sample_files]
    out = []
    for path in paths:
        try:
            ds, _ = parse_dicom_bytes(path.read_bytes(), max_bytes=1 << 30)
        except Exception:
            continue  # READMEs, NIfTI references, hostile files: not the tests' subject
        out.append((path, ds))
    return out


def _datasets(tiny_sample: Path) -> list:
    out = [(path.name, ds) for path, ds in parsed_files(tiny_sample, {"dcm_qa_ts": 1}, 40)]
    assert len(out) >= 20
    return out


def _deepcopy_new(elem: DataElement, value: object, vr: str | None = None) -> DataElement:
    return DataElement(elem.tag, vr or elem.VR, copy.deepcopy(value), validation_mode=IGNORE)


def _probe_everything(ds) -> str:
    """header_to_json as it was: every element through pydicom, each one probed."""

    def model(dataset) -> dict:
        out = {}
        for tag in sorted(dataset.keys()):
            try:
                if deid._is_bulk(dataset.get_item(tag, keep_deferred=True)):
                    continue
                elem = dataset[tag]
                if elem.VR == "SQ":
                    items = [model(item) for item in elem.value]
                    entry = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
                else:
                    entry = header_json._resolve_ambiguous(elem).to_json_dict(None, 0)
                    json.dumps(entry, allow_nan=False)
            except Exception:
                continue
            out[f"{tag:08X}"] = entry
        return out

    return json.dumps(
        model(ds), ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
    )


def _keyword_columns(ds) -> dict:
    row = {}
    for column in DICOM_COLUMNS:
        value = None
        if column.keyword is not None and column.keyword in ds:
            try:
                value = _convert(column, ds[column.keyword].value)
            except Exception:
                value = None
        row[column.name] = value
    return row


def _pydicom_path(patch: pytest.MonkeyPatch) -> None:
    """deidentify as it was: every element converted by ``Dataset.__getitem__`` (none
    decided by its tag alone), every kept value deep-copied into a new element."""
    patch.setattr(deid, "_new", _deepcopy_new)
    patch.setattr(deid, "_keep", lambda elem: _deepcopy_new(elem, elem.value))
    patch.setattr(deid, "_lean_conversion", lambda: False)
    patch.setattr(deid, "_dropped_by_tag", lambda tag, ctx: False)


def _raw_datasets(tiny_sample) -> list:
    """Freshly parsed datasets (raw elements, as the header pass sees them), twice over."""
    return [(name, ds, copy.deepcopy(ds)) for name, ds in _datasets(tiny_sample)]


@pytest.mark.parametrize(
    ("date_mode", "keep_private_tags", "keep_descriptions"),
    [
        ("shift", True, False),
        ("year", True, True),
        ("shift", False, False),
        ("remove", False, True),
    ],
)
def test_header_rows_equal_the_pydicom_path(
    tiny_sample, monkeypatch, date_mode, keep_private_tags, keep_descriptions
):
    pseudonymizer = Pseudonymizer(SECRET)
    config = DeidConfig(
        date_mode=date_mode,
        keep_private_tags=keep_private_tags,
        keep_descriptions=keep_descriptions,
    )
    lean = 0
    for name, ds, twin in _raw_datasets(tiny_sample):
        lean += sum(isinstance(e, RawDataElement) for e in ds.values())
        fast = deidentify(ds, pseudonymizer=pseudonymizer, config=config)
        with monkeypatch.context() as patch:
            _pydicom_path(patch)
            slow = deidentify(twin, pseudonymizer=pseudonymizer, config=config)
        assert header_to_json(fast) == _probe_everything(slow), name
        assert typed_columns(fast) == _keyword_columns(slow), name
    assert lean > 500  # the raw-element path was exercised, not only converted datasets


def test_deidentify_leaves_the_input_as_it_was(tiny_sample):
    pseudonymizer = Pseudonymizer(SECRET)
    for name, ds, twin in _raw_datasets(tiny_sample)[:10]:
        clean = deidentify(ds, pseudonymizer=pseudonymizer, config=DeidConfig())
        clean.PatientName = "CHANGED"
        for elem in clean:
            if elem.VR != "SQ" and not deid._is_bulk(elem) and elem.tag in ds:
                assert ds[elem.tag].value == twin[elem.tag].value, (name, elem.tag)


def test_element_json_equals_pydicom_for_every_element(tiny_sample):
    pseudonymizer = Pseudonymizer(SECRET)
    seen: set[str] = set()
    for name, ds in _datasets(tiny_sample):
        clean = deidentify(ds, pseudonymizer=pseudonymizer, config=DeidConfig())
        for elem in clean.iterall():
            if elem.VR == "SQ" or deid._is_bulk(elem):
                continue
            try:
                expected = header_json._resolve_ambiguous(elem).to_json_dict(None, 0)
            except Exception:
                with pytest.raises(Exception):  # whatever pydicom raised
                    header_json._json_element(elem)
                continue
            assert header_json._json_element(elem) == expected, (name, elem.tag)
            seen.add(elem.VR)
    assert {"CS", "DS", "IS", "UI", "US", "DA", "TM", "LO"} <= seen


def test_unencodable_values_are_dropped_as_before():
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SliceThickness = "NaN"
    ds.PixelSpacing = ["0.5", "inf"]
    ds.Modality = "CT"
    ds.Rows = 4
    text = header_to_json(ds)
    assert text == _probe_everything(ds)
    assert json.loads(text) == {"00080060": {"vr": "CS", "Value": ["CT"]},
                                "00280010": {"vr": "US", "Value": [4]}}  # fmt: skip


def _rescale_int64(pixels, slope, intercept, dtype):
    out = pixels.astype(np.int64) * round(slope) + round(intercept)
    info = np.iinfo(dtype)
    if out.size and (out.min() < info.min or out.max() > info.max):
        raise _Overflow
    return out.astype(dtype)


@pytest.mark.parametrize("stored", [np.uint16, np.int16, np.uint8, np.int32, np.uint32])
@pytest.mark.parametrize("target", [np.int16, np.uint16, np.int32])
def test_integer_rescale_equals_int64_arithmetic(stored, target):
    rng = np.random.default_rng(7)
    info = np.iinfo(stored)
    cases = [(1, -1024), (1, -32768), (2, -32768), (-1, 0), (3, 5), (0, 7), (-2, 100), (1, 1)]
    for low, high in [(0, 4095), (-2048, 2047), (0, 65535), (30000, 40000)]:
        low, high = max(low, int(info.min)), min(high, int(info.max))
        if low > high:
            continue
        pixels = rng.integers(low, high, size=(9, 11), endpoint=True).astype(stored)
        for slope, intercept in cases:
            dtype = np.dtype(target)
            try:
                expected = _rescale_int64(pixels, slope, intercept, dtype)
            except _Overflow:
                with pytest.raises(_Overflow):
                    _rescale(pixels, float(slope), float(intercept), dtype)
                continue
            got = _rescale(pixels, float(slope), float(intercept), dtype)
            assert got.dtype == dtype and np.array_equal(got, expected)


def test_huge_slope_still_overflows():
    pixels = np.arange(4, dtype=np.uint16).reshape(2, 2)
    with pytest.raises(_Overflow):
        _rescale(pixels, 1e308, 0.0, np.dtype(np.int16))
    assert math.isfinite(float(_rescale(pixels, 1.0, -1.0, np.dtype(np.int16)).sum()))


def _syntax(ds) -> str:
    return str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in ds.file_meta else ""


def test_native_frames_equal_pydicom_on_every_transfer_syntax(tiny_sample):
    from voxlake.ingest.readers.dicom import native_frame

    fast_paths = 0
    for name, ds in _datasets(tiny_sample):
        if "PixelData" not in ds:
            continue
        got = native_frame(ds, _syntax(ds))
        if got is None:
            continue  # compressed, big endian, colour, multi-frame: pydicom decodes those
        expected = ds.pixel_array
        assert got.dtype == expected.dtype and np.array_equal(got, expected), name
        assert got.flags.writeable
        fast_paths += 1
    assert fast_paths >= 5


@pytest.mark.parametrize(
    ("allocated", "stored", "signed", "shape"),
    [(16, 12, 1, (5, 7)), (16, 12, 0, (4, 4)), (16, 16, 1, (3, 5)), (8, 7, 1, (3, 3)),
     (8, 8, 0, (3, 5)), (32, 20, 1, (2, 3)), (16, 1, 0, (2, 2))],
)  # fmt: skip
@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
def test_native_frame_masks_and_sign_extends_like_pydicom(allocated, stored, signed, shape, syntax):
    from pydicom.dataset import Dataset, FileMetaDataset

    from voxlake.ingest.readers.dicom import native_frame

    rng = np.random.default_rng(allocated * 100 + stored)
    raw = rng.integers(0, 256, size=shape[0] * shape[1] * allocated // 8, dtype=np.uint8)
    data = raw.tobytes() + (b"\0" if raw.size % 2 else b"")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.Rows, ds.Columns = shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, stored - 1
    ds.PixelRepresentation, ds.SamplesPerPixel = signed, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = data
    ds["PixelData"].VR = "OB" if allocated == 8 else "OW"
    got = native_frame(ds, syntax)
    expected = ds.pixel_array
    assert got is not None and got.dtype == expected.dtype
    assert np.array_equal(got, expected)
    ds.PixelData = data[:-2]  # short: left to pydicom, which reports it
    assert native_frame(ds, syntax) is None


def test_native_frame_leaves_what_pydicom_would_refuse_to_pydicom():
    from pydicom.dataset import Dataset, FileMetaDataset

    from voxlake.ingest.readers.dicom import native_frame

    def dataset() -> Dataset:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored = 2, 2, 16, 12
        ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = bytes(8)
        return ds

    syntax = "1.2.840.10008.1.2.1"
    assert native_frame(dataset(), syntax) is not None
    assert native_frame(dataset(), "1.2.840.10008.1.2.2") is None  # big endian
    for change in (
        lambda ds: delattr(ds, "SamplesPerPixel"),
        lambda ds: setattr(ds, "NumberOfFrames", 0),
        lambda ds: setattr(ds, "NumberOfFrames", 2),
        lambda ds: setattr(ds, "BitsStored", 17),
        lambda ds: setattr(ds, "PhotometricInterpretation", "RGB"),
        lambda ds: setattr(ds, "PhotometricInterpretation", "PALETTE COLOR"),
        lambda ds: setattr(ds, "PixelData", bytes(10)),
    ):
        ds = dataset()
        change(ds)
        assert native_frame(ds, syntax) is None


@pytest.mark.parametrize(
    ("charset", "text"),
    [("ISO_IR 192", "Größe Ωμέγα 日本"), ("ISO_IR 100", "Müller Ærø"), ("ISO_IR 144", "Иванов")],
)
@pytest.mark.parametrize("implicit", [False, True])
def test_raw_text_in_other_character_sets_equals_the_pydicom_path(
    tmp_path, monkeypatch, charset, text, implicit
):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.SpecificCharacterSet = charset
    ds.SOPInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", "1.2.3.5"
    ds.PatientID, ds.PatientName = "ID-" + text[:4], text.replace(" ", "^")
    ds.StudyDescription = ds.SeriesDescription = text
    ds.InstitutionName, ds.StationName = text, text[:16]
    ds.ImageComments = text + " \\ " + text
    ds.BodyPartExamined, ds.Modality, ds.StudyDate = "CHEST", "CT", "20200102"
    ds.PixelSpacing, ds.SliceThickness, ds.Rows = ["0.5", "0.5"], "1.25", 4
    item = Dataset()
    item.CodeMeaning, item.CodeValue = text, "X1"
    ds.ProcedureCodeSequence = Sequence([item])
    ds.add_new(0x00090010, "LO", "VENDOR " + text[:6])
    ds.add_new(0x00091001, "LO", text)
    path = tmp_path / "text.dcm"
    ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    pseudonymizer = Pseudonymizer(SECRET)
    for config in (
        DeidConfig(keep_descriptions=True, keep_private_tags=True),
        DeidConfig(date_mode="year"),
    ):
        raw, _ = parse_dicom_bytes(path.read_bytes(), max_bytes=1 << 20)
        twin = copy.deepcopy(raw)
        fast = deidentify(raw, pseudonymizer=pseudonymizer, config=config)
        with monkeypatch.context() as patch:
            _pydicom_path(patch)
            slow = deidentify(twin, pseudonymizer=pseudonymizer, config=config)
        got = header_to_json(fast)
        assert got == _probe_everything(slow)
        assert typed_columns(fast) == _keyword_columns(slow)
        if config.keep_descriptions:
            assert text in got  # decoded with the file's character set, not Latin-1
