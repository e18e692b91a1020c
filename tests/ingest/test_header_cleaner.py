"""HeaderCleaner gives the header pass what deidentify, header_to_json and typed_columns give.

The cleaner never builds the de-identified dataset and remembers what it made of elements
it met before; here one cleaner serves every file (each twice, in two orders), so an
element remembered from one file, patient or date shift is checked against the next.
"""

from __future__ import annotations

import copy
import io

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from voxlake.config import DeidConfig, IngestConfig
from voxlake.ingest.deid import Pseudonymizer, _clean_one, deidentify, original_identifiers
from voxlake.ingest.dicom_bytes import parse_dicom_bytes
from voxlake.ingest.header_json import HeaderCleaner, header_to_json
from voxlake.ingest.headers import _element_columns, read_headers, typed_columns
from voxlake.ingest.sources import FileRef, list_source

from ..conftest import SECRET
from .test_deid import make_dataset
from .test_fastpaths import parsed_files


def _datasets(tiny_sample) -> list[tuple[str, Dataset]]:
    shared = {"dcm_qa_ts": 1, "dcm_qa_enh": 1, "dcm_qa_ct": 1, "dcm_qa_nih": 6}
    out = [(str(path), ds) for path, ds in parsed_files(tiny_sample, shared, 60)]
    marked = make_dataset()  # already de-identified once: the marks are the file's own
    marked.PatientIdentityRemoved = "NO"
    marked.DeidentificationMethod = "someone else's"
    item = Dataset()
    item.CodeValue = "113101"
    marked.DeidentificationMethodCodeSequence = Sequence([item])
    # The same dates and descriptions for other patients (other date shifts), and the
    # same header again without PatientID or PatientName: built and written, then parsed
    # (raw elements, as the header pass meets them).
    built = [
        ("make_dataset", make_dataset()),
        ("marked", marked),
        ("other patient", make_dataset(PatientID="SOMEONE ELSE")),
        ("third patient", make_dataset(PatientID="THIRD ONE", PatientName="THIRD^ONE")),
    ]
    anonymous = make_dataset()
    del anonymous.PatientID, anonymous.PatientName
    built.append(("anonymous", anonymous))
    for name, ds in built:
        out.append((name, ds))
        out.append((f"{name}, written", _written(ds)))
    assert len(out) > 150
    return out


def _written(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    parsed, _ = parse_dicom_bytes(buffer.getvalue(), max_bytes=1 << 30)
    return parsed


def _expected(ds: Dataset, config: DeidConfig) -> tuple[str, dict]:
    clean = deidentify(ds, pseudonymizer=Pseudonymizer(SECRET), config=config)
    return header_to_json(clean), typed_columns(clean)


def _cleaned(cleaner: HeaderCleaner, ds: Dataset) -> tuple[str, dict]:
    text, filled = cleaner.clean(ds, original_identifiers(ds))
    typed = dict.fromkeys(typed_columns(Dataset()))
    for pairs in filled:
        typed.update(pairs)
    return text, typed


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        DeidConfig(),
        DeidConfig(date_mode="year", keep_private_tags=True, keep_descriptions=False),
        DeidConfig(date_mode="remove", max_date_shift_days=0),
    ],
    ids=["default", "year-private", "remove"],
)
def test_cleaner_equals_deidentify_then_json_and_columns(tiny_sample, config) -> None:
    cases = _datasets(tiny_sample)
    cleaner = HeaderCleaner(SECRET, config, _element_columns)
    # twice over and backwards the second time: every element is met warm and cold
    for name, ds in [*cases, *reversed(cases)]:
        expected = _expected(copy.deepcopy(ds), config)
        assert _cleaned(cleaner, copy.deepcopy(ds)) == expected, name


def test_cleaner_needs_the_secret() -> None:
    from voxlake.errors import SecretMissingError

    cleaner = HeaderCleaner("", DeidConfig(), _element_columns)
    assert "secret=<hidden>" in repr(HeaderCleaner(SECRET, DeidConfig(), _element_columns))
    with pytest.raises(SecretMissingError):
        cleaner.clean(make_dataset(), original_identifiers(make_dataset()))


def test_header_pass_rows_equal_deidentify_path(tiny_sample) -> None:
    refs = [r for r in list_source(tiny_sample.root / "dicom") if isinstance(r, FileRef)]
    config = IngestConfig(secret=SECRET)
    batch = read_headers(refs, secret=SECRET, config=config, run_id="r")
    assert len(batch.instances) == len(refs)
    for row in batch.instances:
        with open(row["url"], "rb") as handle:
            ds, _ = parse_dicom_bytes(handle.read(), max_bytes=1 << 30)
        text, typed = _expected(ds, config.deid)
        assert row["header_json"] == text
        for name, value in typed.items():
            if name != "sop_class_uid" or value:  # else filled from the file meta group
                assert row[name] == value, name


@pytest.mark.parametrize(
    ("vr", "text", "plain"),
    [
        ("DS", b"-163.75 ", True), ("DS", b"1e-5", True), ("DS", b" +3.0", True),
        ("DS", b".5", True), ("DS", b"5.", True), ("DS", b"1.0000000000001", True),
        ("DS", b"0.1\\-0.2\\3E2 ", True), ("DS", b"-0", True),
        ("DS", b"12345678901234567", False), ("DS", b"NaN ", False), ("DS", b"1e400", False),
        ("DS", b"1,5", False), ("DS", b"1.5\x00", False), ("DS", b"\\1", False),
        ("DS", b"", False),
        ("IS", b"27", True), ("IS", b" -0012", True), ("IS", b"1\\2\\3 ", True),
        ("IS", b"+7", True),
        ("IS", b"1234567890123", False), ("IS", b"1.0", False), ("IS", b"2147483648", True),
    ],
)  # fmt: skip
@pytest.mark.parametrize(
    "keyword", ["SliceLocation", "ImagePositionPatient", "InstanceNumber", "EchoNumbers"]
)
def test_numbers_cleaned_without_pydicom_equal_pydicom_s(
    keyword: str, vr: str, text: bytes, plain: bool
) -> None:
    """IS and DS values the cleaner converts itself (`plain`) give the JSON and column
    values pydicom's conversion gives; the others are left to pydicom."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement

    from voxlake.ingest.deid import _context, _lean_encoding
    from voxlake.ingest.header_json import _plain_numbers

    tag = int(tag_for_keyword(keyword) or 0)
    raw = RawDataElement(tag, vr, len(text), text, 0, False, True)
    assert (_plain_numbers(raw) is not None) == plain
    ds = make_dataset()
    ds[tag] = raw
    ctx = _context(ds, original_identifiers(ds), Pseudonymizer(SECRET), DeidConfig())
    encoding = _lean_encoding(ds, ctx)
    cleaner = HeaderCleaner(SECRET, DeidConfig(), _element_columns)
    fast = cleaner._encoded(ds, tag, raw, raw, encoding, ctx)
    slow = cleaner._encode(_clean_one(ds, tag, raw, raw, encoding, ctx))
    assert repr(fast) == repr(slow)
