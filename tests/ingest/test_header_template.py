"""Files parsed from a template equal what pydicom reads, and make the same catalog rows.

The header pass reads a series' first file with pydicom and the next ones by walking
their elements against it (:mod:`voxlake.ingest.header_template`). These tests compare
the two ways element by element (values, offsets and what a deferred read gives) on the
synthetic sample and on real scanner series, compare the rows the header pass makes with
and without templates (and without its cached pixel layouts), and check that files whose
structure differs from the template are read by pydicom.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.uid import ImplicitVRLittleEndian

from voxlake.config import DeidConfig, IngestConfig
from voxlake.errors import NotDicomError
from voxlake.ingest import header_template
from voxlake.ingest.dicom_bytes import parse_dicom_bytes
from voxlake.ingest.header_template import TemplateParser
from voxlake.ingest.headers import read_headers
from voxlake.ingest.readers import native
from voxlake.ingest.sources import list_source

from ..conftest import SECRET, require_shared_data

#: Real series whose files differ in value lengths (UIDs one digit longer, say).
REAL = ("dcm_qa_nih", "dcm_qa_ct", "icometrix_dicom2nifti", "dcm_qa_ts", "dcm_qa_enh")
MAX = 1 << 30


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _assert_same(fast: Any, slow: Any) -> None:
    """Equal datasets: elements (raw offsets included), values, file meta and encoding."""
    assert list(fast.keys()) == list(slow.keys())
    for tag in slow.keys():
        a, b = fast.get_item(tag, keep_deferred=True), slow.get_item(tag, keep_deferred=True)
        assert type(a) is type(b), tag
        if isinstance(b, RawDataElement):
            if tag == 0x7FE00010:  # left in the file's bytes: read when asked
                assert (a.tag, a.VR, a.length, a.value_tell) == (
                    b.tag,
                    b.VR,
                    b.length,
                    b.value_tell,
                )
                assert a.value in (None, b.value)  # None from a template
            else:
                assert a == b, tag
    for tag in slow.keys():
        assert fast[tag] == slow[tag], tag  # converted (a deferred value read from the bytes)
    assert list(fast.file_meta.keys()) == list(slow.file_meta.keys())
    for tag in slow.file_meta.keys():
        assert fast.file_meta[tag] == slow.file_meta[tag], tag
    assert fast.original_encoding == slow.original_encoding
    assert fast.original_character_set == slow.original_character_set
    assert fast.preamble == slow.preamble


def _parsed_or_code(data: bytes) -> tuple[Any, bool] | str:
    """What pydicom's path makes of `data`: the dataset, or the failure code."""
    try:
        return parse_dicom_bytes(data, max_bytes=MAX)
    except NotDicomError as exc:
        return exc.code


def _check(parser: TemplateParser, data: bytes) -> None:
    """`parser` reads `data` as pydicom's path does, or fails with the same code."""
    expected = _parsed_or_code(data)
    if isinstance(expected, str):
        with pytest.raises(NotDicomError) as caught:
            parser.parse(data)
        assert caught.value.code == expected
        return
    fast, gzipped = parser.parse(data)
    assert gzipped == expected[1]
    _assert_same(fast, expected[0])


def _compare_files(paths: list[Path]) -> TemplateParser:
    parser = TemplateParser(max_bytes=MAX)
    for path in paths:
        _check(parser, path.read_bytes())
    return parser


def test_sample_series_are_read_from_templates_as_pydicom_reads_them(tiny_sample) -> None:
    paths = [path for series in tiny_sample.series for path in series.files]
    parser = _compare_files(paths)
    assert parser.patched > len(paths) * 3 // 4  # the walk did the work
    assert parser.compared > len(paths) // 2  # most by comparing bytes with the last walked


@pytest.mark.parametrize("name", REAL)
def test_real_series_are_read_from_templates_as_pydicom_reads_them(name: str) -> None:
    parser = _compare_files(_files(require_shared_data(name)))
    if name == "dcm_qa_nih":  # UIDs of varying lengths: offsets move from file to file
        assert parser.patched > 250


def _rows(refs: list, **kwargs: Any) -> tuple[list, list, dict, list]:
    config = IngestConfig(secret=SECRET, key_map_url="unused://key-map", **kwargs)
    batch = read_headers(refs, secret=SECRET, config=config, run_id="r")
    for row in batch.instances + batch.failures:
        row.pop("ingested_at")
    return batch.instances, batch.failures, batch.pixel_spans, batch.key_map


#: Private tags kept (searched for the patient's identifiers), dates cut to the year.
_PRIVATE = DeidConfig(keep_private_tags=True, date_mode="year")


@pytest.mark.parametrize(
    ("source", "deid"),
    [
        *[(source, None) for source in ["sample", *REAL]],
        ("sample", _PRIVATE),
        ("dcm_qa_nih", _PRIVATE),
    ],
)
def test_catalog_rows_are_the_same_with_or_without_templates(
    tiny_sample, monkeypatch, source: str, deid: DeidConfig | None
) -> None:
    """Rows made from templates (and, within a series, from the elements a file changes
    against the last one walked) equal rows made by pydicom's parse of every file."""
    root = tiny_sample.root / "dicom" if source == "sample" else require_shared_data(source)
    refs = list(list_source(root))
    options = {} if deid is None else {"deid": deid}
    with_templates = _rows(refs, **options)
    monkeypatch.setattr(header_template, "_patched", lambda *args: None)
    monkeypatch.setattr(native, "_layout_key", lambda ds: None)  # and no cached layouts
    _assert_same_rows(with_templates, _rows(refs, **options))
    assert with_templates[0]  # rows were made


def _assert_same_rows(fast: tuple, slow: tuple) -> None:
    """Equal as written (NaN != NaN); on a difference, name the file and the columns."""
    for part, (a, b) in enumerate(zip(fast, slow, strict=True)):
        if repr(a) == repr(b):
            continue
        if isinstance(a, list) and len(a) == len(b):
            for row_a, row_b in zip(a, b, strict=True):
                if repr(row_a) != repr(row_b) and isinstance(row_a, dict):
                    columns = [k for k in row_a if repr(row_a[k]) != repr(row_b.get(k))]
                    where = row_a.get("url", row_a.get("subject"))
                    pytest.fail(f"part {part}: {where}: {columns}")
        pytest.fail(f"part {part} differs: {len(a)} against {len(b)} entries")


def _variant(path: Path, change: Any) -> bytes:
    ds = pydicom.dcmread(path)
    change(ds)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _set(**values: Any) -> Any:
    def change(ds: Any) -> None:
        for name, value in values.items():
            setattr(ds, name, value)

    return change


def _implicit(ds: Any) -> None:
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian


@pytest.mark.parametrize(
    ("change", "read_by"),
    [
        (_set(InstanceNumber="7"), "template"),
        (_set(SOPInstanceUID="1.2.3.4.5.6.7.8.9.10.11.12.13.14"), "template"),  # moves offsets
        (_set(SpecificCharacterSet="ISO_IR 144"), "pydicom"),  # how pydicom decodes text
        (
            _set(SpecificCharacterSet="ISO_IR 144", SOPInstanceUID="1.2.3.4.5.6.7.8.9.10.11"),
            "pydicom",
        ),  # the same, with offsets moved
        (_set(ImageComments="an element the template lacks"), "pydicom"),
        (_implicit, "pydicom"),  # another transfer syntax
    ],
)
def test_files_whose_structure_differs_are_read_by_pydicom(tiny_sample, change, read_by) -> None:
    first, second = tiny_sample.series[0].files[:2]
    data = _variant(second, change)
    parser = TemplateParser(max_bytes=MAX)
    parser.parse(_variant(first, _set(SpecificCharacterSet="ISO_IR 100")))
    fast, _ = parser.parse(data)
    assert (parser.patched, parser.parsed) == ((1, 1) if read_by == "template" else (0, 2))
    _assert_same(fast, parse_dicom_bytes(data, max_bytes=MAX)[0])


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[:-100],  # pixel data cut short
        lambda data: data[:600],  # header cut short
        lambda data: data[:400] + b"\xff" * 8 + data[408:],  # a tag overwritten
        lambda data: data[:132] + bytes(len(data) - 132),  # zeros after the preamble
    ],
)
def test_damaged_files_fail_as_pydicom_makes_them_fail(tiny_sample, damage) -> None:
    first, second = tiny_sample.series[0].files[:2]
    data = damage(second.read_bytes())
    parser = TemplateParser(max_bytes=MAX)
    parser.parse(first.read_bytes())
    _check(parser, data)


def _implicit_file(first_value_length: int) -> bytes:
    """An implicit VR little endian file whose first body element has that length."""
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.add_new(0x00070010, "LO", "x" * first_value_length)  # first in the body: group 7
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Modality = "CT"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored = 2, 2, 16, 16
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(8)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=True, little_endian=True)
    return buffer.getvalue()


def test_an_implicit_body_that_looks_explicit_is_left_to_pydicom() -> None:
    """pydicom reads a body said to be implicit VR as explicit when the first element's
    length bytes spell two capital letters (0x4142 = "BA"): so does the parser."""
    parser = TemplateParser(max_bytes=MAX)
    _check(parser, _implicit_file(16))
    _check(parser, _implicit_file(18))  # walked: only a length differs
    assert (parser.parsed, parser.patched) == (1, 1)
    _check(parser, _implicit_file(0x4142))  # "BA" where an explicit VR would be
    assert parser.patched == 1


def _value_at(data: bytes, tag: int) -> tuple[int, int]:
    """Offset and length of the value of top-level or file meta element `tag`."""
    ds = pydicom.dcmread(io.BytesIO(data), defer_size=0)
    where = ds.file_meta if tag >> 16 == 2 else ds
    element = where.get_item(tag, keep_deferred=True)
    if isinstance(element, RawDataElement):
        return element.value_tell, element.length
    return element.file_tell, len(data[element.file_tell :].split(b"\0", 1)[0])


def _replaced(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def test_a_file_is_compared_with_the_last_and_its_changed_elements_named(tiny_sample) -> None:
    first, second, third = (path.read_bytes() for path in tiny_sample.series[0].files[:3])
    parser = TemplateParser(max_bytes=MAX)
    parser.parse(first)
    _check(parser, second)
    reference = parser.generation
    instance = int(pydicom.datadict.tag_for_keyword("InstanceNumber") or 0)
    changed = set()
    for data in (second, third):
        offset, length = _value_at(data, instance)
        variant = _replaced(data, offset, b"9".rjust(length))  # another value, same length
        _check(parser, variant)
        assert parser.generation == reference and parser.changed is not None
        changed |= parser.changed
    assert instance in changed
    assert 0x00080018 in changed and 0x00020003 in changed  # SOPInstanceUID, in meta too
    assert parser.compared >= 2


_EXPLICIT, _BIG_ENDIAN = b"1.2.840.10008.1.2.1\0", b"1.2.840.10008.1.2.2\0"  # same length
_CHARSET = 0x00080005


def _vr_swapped(data: bytes, tag: int, vr: bytes) -> bytes:
    offset, _ = _value_at(data, tag)
    return _replaced(data, offset - 4, vr)  # an explicit short VR sits 4 bytes before


@pytest.mark.parametrize(
    ("what", "change"),
    [
        # a VR (outside any value), same file length: walked, then read by pydicom
        ("VR", lambda data: _vr_swapped(data, 0x00080060, b"SH")),  # Modality CS -> SH
        # values the comparison may not take over from the reference
        ("transfer syntax", lambda data: data.replace(_EXPLICIT, _BIG_ENDIAN, 1)),
        (
            "character set",
            lambda data: _replaced(data, _value_at(data, _CHARSET)[0], b"ISO_IR 101"),
        ),
    ],
)
def test_files_of_the_same_length_with_another_structure_are_not_compared(
    tiny_sample, what: str, change: Any
) -> None:
    first, second = tiny_sample.series[0].files[:2]
    base = _variant(first, _set(SpecificCharacterSet="ISO_IR 100"))
    other = _variant(second, _set(SpecificCharacterSet="ISO_IR 100"))
    data = change(other)
    assert len(data) == len(other) and data != other, what
    parser = TemplateParser(max_bytes=MAX)
    parser.parse(base)
    _check(parser, other)
    compared = parser.compared
    _check(parser, data)
    assert parser.compared == compared, what


def test_the_parser_keeps_no_file_alive_between_files(tiny_sample) -> None:
    """The reference a next file is compared with is its header's bytes, not the file:
    after three 16 MiB files, the parser holds well under one."""
    import gc
    import tracemalloc

    def big(number: int) -> bytes:
        def change(ds: Any) -> None:
            ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = (
                2048,
                4096,
                16,
                16,
                15,
            )
            ds.PixelData = bytes([number]) * (2048 * 4096 * 2)
            ds.InstanceNumber = str(number)

        return _variant(tiny_sample.series[0].files[0], change)

    parser = TemplateParser(max_bytes=MAX)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in (1, 2, 3):
            data = big(number)
            ds, _ = parser.parse(data)
            assert ds.InstanceNumber == number
            del data, ds
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert parser.compared == 2  # the second and third were compared, not walked
    assert held < 4 << 20, held


def test_a_changed_private_creator_cleans_the_file_whole(tiny_sample, tmp_path, monkeypatch):
    """In an implicit VR file pydicom finds a private element's VR through its creator:
    a file whose creator alone changed (same length) must not reuse the reference's
    cleaned private elements."""
    first, second = tiny_sample.series[0].files[:2]

    def private(creator: str, number: str) -> Any:
        def change(ds: Any) -> None:
            _implicit(ds)
            ds.add_new(0x00290010, "LO", creator)
            ds.add_new(0x00291008, "CS", "IMAGE NUM 4")  # CS under SIEMENS CSA HEADER
            ds.InstanceNumber = number

        return change

    paths = []
    for name, path, change in [
        ("a.dcm", first, private("SIEMENS CSA HEADER", "1")),
        ("b.dcm", second, private("SIEMENS CSA HEADEX", "2")),  # unknown: read as UN
    ]:
        paths.append(tmp_path / name)
        paths[-1].write_bytes(_variant(path, change))
    refs = list(list_source(tmp_path))
    options = {"deid": _PRIVATE}
    with_templates = _rows(refs, **options)
    monkeypatch.setattr(header_template, "_patched", lambda *args: None)
    _assert_same_rows(with_templates, _rows(refs, **options))
    jsons = [row["header_json"] for row in with_templates[0]]
    assert '"00291008"' in jsons[0] and jsons[0].count('"vr":"CS"') > jsons[1].count('"vr":"CS"')


def test_walked_files_name_their_changes_against_the_template(tiny_sample) -> None:
    """A walked file is numbered and its changes are against the template's; a file then
    compared with it names its changes against it."""
    first, second, third = tiny_sample.series[0].files[:3]
    longer = _set(SOPInstanceUID="1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16.17")  # moves offsets
    parser = TemplateParser(max_bytes=MAX)
    parser.parse(first.read_bytes())
    template = parser.generation
    assert (parser.base, parser.changed) == (None, None)
    _check(parser, _variant(second, longer))
    assert (parser.base, parser.generation) == (template, template + 1)
    assert parser.changed is not None and 0x00080018 in parser.changed
    _check(parser, _variant(third, longer))  # the same length as the walked one
    assert parser.compared == 1 and parser.base == template + 1
    assert parser.changed is not None and 0x00080018 not in parser.changed  # same UID
