"""Tests for voxlake.ingest.deid: PS3.15 Annex E Basic Profile de-identification."""

from __future__ import annotations

import copy
import datetime as dt
import json
import pickle
import string

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom import examples
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from voxlake.config import DeidConfig
from voxlake.errors import ConfigError, SecretMissingError
from voxlake.ingest import deid
from voxlake.ingest.deid import (
    DESCRIPTION_KEYWORDS,
    IDENTIFYING_KEYWORDS,
    Pseudonymizer,
    deidentify,
    original_identifiers,
)
from voxlake.ingest.header_json import header_to_json
from voxlake.keys import keyed_hash

SECRET = "unit-test-secret-4f1c"
PZ = Pseudonymizer(SECRET)
ROOT = "1.2.826.0.1.3680043.8.498.77"
STUDY_UID, SERIES_UID, SOP_UID, FOR_UID = (f"{ROOT}.{n}" for n in (1, 2, 3, 4))

#: Every identifying value planted in the test dataset; none may survive.
PLANTED = {
    "PatientName": "DOE^JANE^PLANT",
    "PatientID": "PID7731PLANT",
    "PatientAddress": "42 PLANTED STREET SPRINGFIELD",
    "PatientTelephoneNumbers": "555-0199-PLANT",
    "InstitutionName": "ST PLANTED HOSPITAL",
    "InstitutionAddress": "1 HOSPITAL PLANTED WAY",
    "ReferringPhysicianName": "HOUSE^GREGORY^PLANT",
    "PerformingPhysicianName": "WATSON^JOHN^PLANT",
    "OperatorsName": "TECH^OPERATOR^PLANT",
    "AccessionNumber": "ACC99812PLANT",
    "StudyID": "STUDYIDPLANT",
    "StationName": "CTSTATIONPLANT",
    "DeviceSerialNumber": "SERIALPLANT42",
    "OtherPatientIDs": "OTHERIDPLANT",
    "PatientComments": "patient told us her name is plant",
    "AdditionalPatientHistory": "history of planted things",
    "RequestingPhysician": "REQUESTER^PLANT",
}
NESTED_PLANTED = ["SEQPATIENTIDPLANT", "SEQISSUERPLANT", "REQPROCIDPLANT", "SPSIDPLANT"]
PRIVATE_PLANTED = "VENDOR SECRET 991"
BIRTH_DATE = "19610412"
STUDY_DATE = "20200315"


def make_dataset(**overrides: object) -> Dataset:
    """A CT header full of identifiers, geometry and a private block."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    for keyword, value in PLANTED.items():
        setattr(ds, keyword, value)
    ds.PatientBirthDate = BIRTH_DATE
    ds.PatientAge = "058Y"
    ds.PatientSex = "F"
    ds.PatientSize = "1.68"
    ds.PatientWeight = "61.5"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = STUDY_DATE
    ds.InstanceCreationDate = "20200316"  # not in Table E.1-1: still shifted
    ds.StudyTime = "101530"
    ds.AcquisitionDateTime = "20200315101530.123456+0100"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, SERIES_UID
    ds.SOPInstanceUID, ds.FrameOfReferenceUID = SOP_UID, FOR_UID
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.ManufacturerModelName = "Scanner 9000"
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDescription = "CT CHEST W CONTRAST"
    ds.SeriesDescription = "AXIAL 1.25 LUNG"
    ds.ProtocolName = "CHEST ROUTINE"
    ds.ImageComments = "kept comment"
    ds.ImagePositionPatient = ["-150.0", "-160.0", "-300.5"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = ["0.7", "0.7"]
    ds.SliceThickness = "1.25"
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    ds.KVP = "120"
    ds.Rows = ds.Columns = 32
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = bytes(32 * 32 * 2)
    ds.add_new(0x50003000, "OB", b"\x01\x02")  # curve data
    ds.add_new(0x60003000, "OB", b"\xff" * 8)  # overlay data
    ds.add_new(0x60000010, "US", 4)  # overlay rows: not identifying, kept
    ds.add_new(0x00191001, "OB", b"x" * 4000)  # private bulk
    block = ds.private_block(0x0029, "ACME PRIVATE", create=True)
    block.add_new(0x10, "LO", PRIVATE_PLANTED)
    block.add_new(0x11, "DA", STUDY_DATE)
    block.add_new(0x12, "LO", f"scan of jane doe^{PLANTED['PatientID']}")
    block.add_new(0x13, "UN", b"patient: Doe^Jane^Plant ")
    other = Dataset()
    other.PatientID = NESTED_PLANTED[0]
    other.IssuerOfPatientID = NESTED_PLANTED[1]
    ds.OtherPatientIDsSequence = Sequence([other])
    request = Dataset()
    request.RequestedProcedureID = NESTED_PLANTED[2]
    request.ScheduledProcedureStepID = NESTED_PLANTED[3]
    request.AccessionNumber = PLANTED["AccessionNumber"]
    request.RequestedProcedureDescription = "CT CHEST"
    ds.RequestAttributesSequence = Sequence([request])
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = f"{ROOT}.99"
    ds.ReferencedImageSequence = Sequence([ref])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = SOP_UID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "AEPLANT"
    for keyword, value in overrides.items():
        setattr(ds, keyword, value)
    return ds


def run(ds: Dataset, **config: object) -> Dataset:
    return deidentify(ds, pseudonymizer=PZ, config=DeidConfig(**config))  # type: ignore[arg-type]


def all_uids(ds: Dataset) -> list[str]:
    return [str(e.value) for e in ds.iterall() if e.VR == "UI" and e.value]


@pytest.mark.parametrize("date_mode", ["shift", "year", "remove"])
@pytest.mark.parametrize("keep_descriptions", [True, False])
def test_planted_identifiers_never_reach_json(date_mode: str, keep_descriptions: bool) -> None:
    text = header_to_json(
        run(make_dataset(), date_mode=date_mode, keep_descriptions=keep_descriptions)
    )
    for value in [*PLANTED.values(), *NESTED_PLANTED, PRIVATE_PLANTED, "AEPLANT"]:
        assert value not in text
    for component in ("DOE", "JANE", "GREGORY", "WATSON"):
        assert component not in text
    for uid in (STUDY_UID, SERIES_UID, SOP_UID, FOR_UID, f"{ROOT}.99"):
        assert uid not in text
    assert BIRTH_DATE not in text
    assert STUDY_DATE not in text
    assert "PLANT" not in text.upper()


def test_kept_attributes_keep_their_values() -> None:
    out = run(make_dataset())
    assert out.PatientAge == "058Y"
    assert out.PatientSex == "F"
    assert float(out.PatientSize) == pytest.approx(1.68)
    assert float(out.PatientWeight) == pytest.approx(61.5)
    assert [float(v) for v in out.ImagePositionPatient] == [-150.0, -160.0, -300.5]
    assert [float(v) for v in out.PixelSpacing] == [0.7, 0.7]
    assert float(out.RescaleIntercept) == -1024.0
    assert float(out.KVP) == 120.0
    assert (out.Modality, out.Manufacturer, out.ManufacturerModelName) == (
        "CT",
        "ACME",
        "Scanner 9000",
    )
    assert out.BodyPartExamined == "CHEST"
    assert list(out.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert out.SOPClassUID == CTImageStorage
    assert out.ReferencedImageSequence[0].ReferencedSOPClassUID == CTImageStorage
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out[0x60000010].value == 4
    assert (out.Rows, out.PixelRepresentation) == (32, 1)


def test_profile_actions_remove_empty_and_mark() -> None:
    out = run(make_dataset())
    for keyword in (
        "PatientAddress",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "PatientComments",
    ):
        assert keyword not in out
    for keyword in ("InstitutionName", "ReferringPhysicianName", "StudyID", "PatientBirthDate"):
        assert keyword in out
        assert out[keyword].value in ("", None)
    assert "SourceApplicationEntityTitle" not in out.file_meta
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethod == "voxlake Basic Profile (PS3.15 E.1.1)"
    codes = [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107", "113108"]
    assert all(i.CodingSchemeDesignator == "DCM" for i in out.DeidentificationMethodCodeSequence)
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"


@pytest.mark.parametrize(
    ("config", "codes", "temporal"),
    [
        ({"date_mode": "year"}, ["113100", "113107", "113108"], "MODIFIED"),
        ({"date_mode": "remove"}, ["113100", "113108"], "REMOVED"),
        ({"max_date_shift_days": 0}, ["113100", "113106", "113108"], "UNMODIFIED"),
    ],
)
def test_method_codes_follow_date_mode(config: dict, codes: list[str], temporal: str) -> None:
    out = run(make_dataset(), **config)
    assert [i.CodeValue for i in out.DeidentificationMethodCodeSequence] == codes
    assert out.LongitudinalTemporalInformationModified == temporal


def test_bulk_curves_and_overlays_removed() -> None:
    out = run(make_dataset(), keep_private_tags=True)
    text = header_to_json(out)
    for tag in (0x7FE00010, 0x50003000, 0x60003000, 0x00191001):
        assert tag not in out
        assert f"{tag:08X}" not in text
    assert "BulkDataURI" not in text
    json.loads(text)


def test_patient_and_accession_pseudonyms() -> None:
    out = run(make_dataset())
    key = PZ.key("patient", PLANTED["PatientID"])
    assert out.PatientID == key
    assert str(out.PatientName) == key
    # SH holds 16 characters: the accession pseudonym is the key's 16-character prefix.
    assert out.AccessionNumber == PZ.key("accession", PLANTED["AccessionNumber"])[:16]
    assert out.RequestAttributesSequence[0].AccessionNumber == out.AccessionNumber
    assert len(key) == 32
    assert int(key, 16) >= 0


def test_patient_name_without_patient_id_is_emptied() -> None:
    ds = make_dataset()
    del ds.PatientID
    out = run(ds)
    assert "PatientID" not in out
    assert out.PatientName == ""
    assert original_identifiers(ds)["PatientID"] == ""
    # Without a PatientID the study anchors the date shift: still shifted, still deterministic.
    assert out.StudyDate != STUDY_DATE
    assert out.StudyDate == run(make_dataset(PatientID=""))["StudyDate"].value


def test_uids_replaced_deterministically_and_consistently() -> None:
    first, again = run(make_dataset()), run(make_dataset())
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert first[kw].value == again[kw].value == PZ.uid(make_dataset()[kw].value)
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    # A second instance that references the first one: the reference still resolves.
    referrer = make_dataset(SOPInstanceUID=f"{ROOT}.5")
    referrer.ReferencedImageSequence[0].ReferencedSOPInstanceUID = SOP_UID
    out = run(referrer)
    assert out.ReferencedImageSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert out.SOPInstanceUID != first.SOPInstanceUID
    assert out.StudyInstanceUID == first.StudyInstanceUID
    for uid in all_uids(first) + all_uids(out):
        assert UID(uid).is_valid
        assert len(uid) <= 64


def test_unlisted_uids_and_names_follow_the_safety_rules() -> None:
    ds = make_dataset(SOPClassUID="1.3.12.2.1107.5.9.1")  # a vendor's private SOP class
    ds.AcquisitionUID = f"{ROOT}.42"  # not in Table E.1-1: replaced all the same
    ds.SecondaryReviewerName = "REVIEWER^PLANT"  # a person name the table does not list
    ds.ReferencedColorPaletteInstanceUID = "1.2.840.10008.1.5.1"  # well-known instance
    out = run(ds)
    assert out.SOPClassUID == "1.3.12.2.1107.5.9.1"
    assert out.AcquisitionUID == PZ.uid(f"{ROOT}.42")
    assert out.SecondaryReviewerName == ""
    assert out.ReferencedColorPaletteInstanceUID == "1.2.840.10008.1.5.1"


def shifted_days(original: str, shifted: str) -> int:
    as_date = dt.date.fromisoformat
    return (as_date(shifted[:4] + "-" + shifted[4:6] + "-" + shifted[6:8]) - as_date(
        original[:4] + "-" + original[4:6] + "-" + original[6:8]
    )).days  # fmt: skip


def test_date_shift_is_per_patient_and_keeps_intervals() -> None:
    first = run(make_dataset(StudyDate="20200101"), max_date_shift_days=100)
    second = run(make_dataset(StudyDate="20210615", StudyInstanceUID=f"{ROOT}.6"))
    offset = shifted_days("20200101", first.StudyDate)
    assert offset != 0
    assert -100 <= offset <= 100
    assert offset == PZ.date_offset_days(PLANTED["PatientID"], 100)
    default_offset = PZ.date_offset_days(PLANTED["PatientID"], 365)
    assert shifted_days("20210615", second.StudyDate) == default_offset
    assert shifted_days("20200316", second.InstanceCreationDate) == default_offset
    assert shifted_days(STUDY_DATE, second.ContentDate) == default_offset
    # DT: date part shifted, time of day and time zone kept; TM kept in shift mode.
    assert second.AcquisitionDateTime[8:] == "101530.123456+0100"
    assert shifted_days(STUDY_DATE, second.AcquisitionDateTime[:8]) == default_offset
    assert second.StudyTime == "101530"
    assert second.PatientBirthDate == ""
    offsets = {PZ.date_offset_days(f"patient-{n}", 365) for n in range(20)}
    assert len(offsets) > 10
    assert 0 not in offsets


def test_year_mode_and_remove_mode() -> None:
    year = run(make_dataset(), date_mode="year")
    assert year.StudyDate == year.InstanceCreationDate == "20200101"
    assert year.AcquisitionDateTime == "20200101"
    assert year.StudyTime == ""
    removed = run(make_dataset(), date_mode="remove")
    assert removed.StudyDate == ""
    assert removed.InstanceCreationDate == ""
    assert removed.StudyTime == ""
    assert "SeriesDate" not in removed or removed.SeriesDate == ""
    text = header_to_json(removed)
    assert "2020" not in text


def test_keep_descriptions_switch() -> None:
    kept = run(make_dataset(), keep_descriptions=True)
    assert kept.StudyDescription == "CT CHEST W CONTRAST"
    assert kept.SeriesDescription == "AXIAL 1.25 LUNG"
    assert kept.ProtocolName == "CHEST ROUTINE"
    assert kept.ImageComments == "kept comment"
    assert kept.RequestAttributesSequence[0].RequestedProcedureDescription == "CT CHEST"
    assert "RequestedProcedureID" not in kept.RequestAttributesSequence[0]
    dropped = run(make_dataset(), keep_descriptions=False)
    text = header_to_json(dropped)
    for value in ("CT CHEST", "AXIAL 1.25 LUNG", "CHEST ROUTINE", "kept comment"):
        assert value not in text
    assert "StudyDescription" not in dropped
    assert "RequestAttributesSequence" not in dropped


def test_private_tags_switch() -> None:
    dropped = run(make_dataset())
    assert not any(elem.tag.is_private for elem in dropped.iterall())
    kept = run(make_dataset(), keep_private_tags=True)
    block = kept.private_block(0x0029, "ACME PRIVATE")
    assert block[0x10].value == PRIVATE_PLANTED
    assert 0x12 not in block  # repeats the patient's name: dropped even when private is kept
    assert 0x13 not in block  # the same, in an undecoded (UN) value
    assert shifted_days(STUDY_DATE, block[0x11].value) == PZ.date_offset_days(
        PLANTED["PatientID"], 365
    )


def test_input_not_mutated() -> None:
    ds = make_dataset()
    before = copy.deepcopy(ds)
    out = run(ds)
    assert ds == before
    assert ds.file_meta == before.file_meta
    assert str(ds.PatientName) == PLANTED["PatientName"]
    assert ds.OtherPatientIDsSequence[0].PatientID == NESTED_PLANTED[0]
    assert out is not ds


def raw(tag: int, vr: str, value: bytes) -> RawDataElement:
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def test_odd_values_are_dropped_not_raised(recwarn: pytest.WarningsRecorder) -> None:
    ds = make_dataset()
    ds[0x00080020] = raw(0x00080020, "DA", b"2020-13-45")  # StudyDate: no such day
    ds[0x00080023] = raw(0x00080023, "DA", b"20200101\\20200102")  # ContentDate is VM 1
    ds[0x00080012] = raw(0x00080012, "LO", b"not a date")  # InstanceCreationDate, wrong VR
    ds[0x00080021] = raw(0x00080021, "DA", b"20200230")  # SeriesDate: February 30th
    ds[0x00280030] = raw(0x00280030, "DS", b"abc\\x1")  # PixelSpacing: not numbers
    ds[0x0008FF01] = raw(0x0008FF01, "UN", b"PLANTED")  # unknown public tag: cannot be vetted
    out = run(ds)
    text = header_to_json(out)
    for keyword in ("StudyDate", "ContentDate", "InstanceCreationDate", "SeriesDate"):
        assert keyword not in out
    assert "2020-13-45" not in text
    assert "PLANT" not in text
    assert "00280030" not in json.loads(text)  # kept in the dataset, but JSON cannot carry it
    assert out.Modality == "CT"
    assert not recwarn.list, [str(w.message) for w in recwarn.list]


def test_header_to_json_is_compact_sorted_and_deterministic() -> None:
    out = run(make_dataset())
    text = header_to_json(out)
    assert text == header_to_json(run(make_dataset()))
    parsed = json.loads(text)
    assert list(parsed) == sorted(parsed)
    assert text == json.dumps(parsed, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    assert parsed["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": out.PatientID}]}
    assert parsed["00080060"] == {"vr": "CS", "Value": ["CT"]}


def test_original_identifiers() -> None:
    ids = original_identifiers(make_dataset())
    assert ids == {
        "PatientID": PLANTED["PatientID"],
        "StudyInstanceUID": STUDY_UID,
        "SeriesInstanceUID": SERIES_UID,
        "SOPInstanceUID": SOP_UID,
        "AccessionNumber": PLANTED["AccessionNumber"],
        "FrameOfReferenceUID": FOR_UID,
    }
    assert original_identifiers(Dataset()) == dict.fromkeys(ids, "")


def test_pseudonymizer_keys_and_secrecy() -> None:
    other = Pseudonymizer("another-secret")
    assert PZ.key("patient", "123") == Pseudonymizer(SECRET).key("patient", "123")
    assert PZ.key("patient", "123") != other.key("patient", "123")
    assert PZ.key("patient", "123") != PZ.key("study", "123")
    assert PZ.key("patient", "123") != PZ.key("patient", "124")
    assert all(c in string.hexdigits.lower() for c in PZ.key("series", "x"))
    assert SECRET not in repr(PZ)
    assert SECRET not in str(PZ)
    clone = pickle.loads(pickle.dumps(PZ))
    assert clone.key("instance", "9") == PZ.key("instance", "9")
    assert SECRET not in repr(clone)
    assert PZ.key("accession", " A1 ") == keyed_hash(SECRET, "accession", "A1")
    uid = PZ.uid("1.2.3")
    assert uid.startswith("2.25.")
    assert UID(uid).is_valid
    assert uid == PZ.uid("1.2.3") != PZ.uid("1.2.4")
    with pytest.raises(SecretMissingError):
        Pseudonymizer("")
    with pytest.raises(ConfigError):
        PZ.key("pa\x1ftient", "x")
    with pytest.raises(ConfigError):
        PZ.date_offset_days("x", -1)
    assert PZ.date_offset_days("x", 0) == 0
    assert {PZ.date_offset_days(str(n), 1) for n in range(64)} == {-1, 1}


def test_keyword_sets() -> None:
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "InstitutionName", "StudyDate"):
        assert keyword in IDENTIFYING_KEYWORDS
    for keyword in ("PatientAge", "PatientSex", "PatientWeight", "Modality", "PixelSpacing"):
        assert keyword not in IDENTIFYING_KEYWORDS
    assert {"StudyDescription", "SeriesDescription", "ProtocolName"} <= DESCRIPTION_KEYWORDS
    assert "PatientComments" not in DESCRIPTION_KEYWORDS
    assert len(IDENTIFYING_KEYWORDS) > 300


def test_all_names_resolve() -> None:
    for name in deid.__all__:
        assert hasattr(deid, name)


def test_real_file_example_ct() -> None:
    ds = examples.ct
    originals = [str(ds.PatientName), ds.PatientID, ds.InstitutionName, ds.StudyInstanceUID]
    out = run(ds)
    text = header_to_json(out)
    for value in originals:
        assert value not in text
    assert out.Modality == "CT"
    assert "PixelData" not in out
    assert not any(elem.tag.is_private for elem in out.iterall())
    assert out.PatientID == PZ.key("patient", ds.PatientID)


_TOKEN = st.text(string.ascii_letters + string.digits, min_size=8, max_size=24).filter(
    # a letter outside a-f keeps the value from matching hex keys, UIDs or dates by chance
    lambda s: any(c.lower() in "ghijklmnopqrstuvwxyz" for c in s)
)
_BASELINE = header_to_json(run(make_dataset())).lower()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=_TOKEN, pid=_TOKEN, institution=_TOKEN, other=_TOKEN)
def test_random_identifiers_never_reach_json(
    name: str, pid: str, institution: str, other: str
) -> None:
    for value in (name, pid, institution, other):
        assume(value.lower() not in _BASELINE)
    ds = make_dataset(PatientName=f"{name}^{other}", PatientID=pid, InstitutionName=institution)
    ds.OtherPatientIDs = [other, pid]
    ds.OtherPatientIDsSequence[0].PatientID = name
    text = header_to_json(run(ds, keep_descriptions=True))
    for value in (name, pid, institution, other):
        assert value not in text
