"""De-identification's table and value rules: which action each tag gets, and how dates,
UIDs, dummies and copied elements are written (used by :mod:`voxlake.ingest.deid`)."""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from pydicom.config import IGNORE
from pydicom.datadict import get_entry, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.valuerep import PersonName

from voxlake.ingest import _deid_table as _table

if TYPE_CHECKING:
    from voxlake.config import DeidConfig


_COMBINED: Final = {"X/Z": "Z", "Z/D": "Z", "X/Z/D": "Z", "X/D": "D", "X/Z/U*": "U*"}.get


_ROWS: Final = (*_table.BASIC_PROFILE, *_table.VOXLAKE_ADDITIONS)


#: tag -> (resolved action, option flags)
_RULES: Final[Mapping[int, tuple[str, str]]] = MappingProxyType(
    {tag: (_COMBINED(action, action), flags) for tag, _, action, flags in _ROWS}
)


_PATIENT_ID: Final = 0x00100020


_PATIENT_NAME: Final = 0x00100010


_ACCESSION: Final = 0x00080050


_CLASS_UID_TAGS: Final = frozenset(tag_for_keyword(kw) or 0 for kw in _table.CLASS_UID_KEYWORDS)


_DICOM_ROOT: Final = "1.2.840.10008."


_BINARY_VRS: Final = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW"})


_BULK_BYTES: Final = 1024


_DATE_VRS: Final = frozenset({"DA", "DT", "TM"})


_SENSITIVE_VRS: Final = frozenset({"DA", "DT", "TM", "UI", "PN"})


_TEXT_VRS: Final = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})


_DUMMY: Final = "ANONYMIZED"


_DA_RE: Final = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")


_DT_RE: Final = re.compile(r"(\d{4})(\d{2})(\d{2})((?:\d{2}){0,3}(?:\.\d{1,6})?(?:[+-]\d{4})?)")


_DT_YEAR_RE: Final = re.compile(r"(\d{4})[\d.]*(?:[+-]\d{4})?")


_TM_RE: Final = re.compile(r"\d{2}(?::?\d{2}(?::?\d{2}(?:\.\d{1,6})?)?)?")


_NEEDLE_KEYWORDS: Final = (
    "PatientID", "PatientName", "AccessionNumber", "OtherPatientIDs", "OtherPatientNames",
)  # fmt: skip


_OVERLAYS: Final = (0x3000, 0x4000)


_PSEUDONYMIZED: Final = frozenset({_PATIENT_NAME, _PATIENT_ID, _ACCESSION})


#: Set by _mark on the output: a copy, never the input's element, may be changed there.
_MARKED: Final = frozenset(
    tag_for_keyword(kw) or 0
    for kw in (
        "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
        "LongitudinalTemporalInformationModified",
    )
)  # fmt: skip


def _needles(ds: Dataset) -> tuple[str, ...]:
    # Kept private elements are scanned for the patient's own identifiers (best effort: a
    # vendor block repeating the name or ID verbatim is common); short values would match noise.
    found: set[str] = set()
    for keyword in _NEEDLE_KEYWORDS:
        with contextlib.suppress(Exception):
            for value in _values(ds[keyword]) if keyword in ds else ():
                text = _strip(value).upper()
                found.update(p for p in (text, *re.split(r"[\s\\^=]+", text)) if len(p) >= 4)
    return tuple(sorted(found))


def _mentions(elem: DataElement, needles: tuple[str, ...]) -> bool:
    text = "\\".join(_strip(v) for v in _values(elem)).upper()
    return any(needle in text for needle in needles)


def _shift(value: str, vr: str, offset: dt.timedelta) -> str:
    match = (_DA_RE if vr == "DA" else _DT_RE).fullmatch(value)
    if match is None:
        raise ValueError("not a full date")
    y, m, d = (int(g) for g in match.groups()[:3])
    day = dt.date(y, m, d) + offset
    rest = match.group(4) if vr == "DT" else ""
    return f"{day.year:04d}{day.month:02d}{day.day:02d}{rest}"


def _year(value: str, vr: str) -> str:
    match = (_DA_RE if vr == "DA" else _DT_YEAR_RE).fullmatch(value)
    if match is None:
        raise ValueError("not a date")
    return f"{match.group(1)}0101"


def _check_time(value: str) -> str:
    if _TM_RE.fullmatch(value) is None:
        raise ValueError("not a time")
    return value


def _code_item(code: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator = code, "DCM"
    item.CodeMeaning = _table.CID_7050[code]
    return item


def _is_bulk(elem: DataElement | RawDataElement | None) -> bool:
    if elem is None:
        return False
    if int(elem.tag) >> 16 == 0x7FE0:
        return True
    vr = elem.VR or _dictionary(elem.tag)[0]
    if vr not in _BINARY_VRS:
        return False
    if isinstance(elem, RawDataElement):
        return elem.length > _BULK_BYTES  # undefined length (0xFFFFFFFF) counts as bulk
    value = elem.value
    return isinstance(value, bytes | bytearray) and len(value) > _BULK_BYTES


def _bad_vr(tag: int, vr: str) -> bool:
    """True when the VR contradicts the dictionary on an attribute whose VR drives a rule."""
    expected = _dictionary(tag)[0]
    if expected == "UN" or vr in expected.split(" or "):
        return False
    return vr in _SENSITIVE_VRS or bool(_SENSITIVE_VRS.intersection(expected.split(" or ")))


def _well_known(tag: int, uid: str) -> bool:
    return tag in _CLASS_UID_TAGS or uid.startswith(_DICOM_ROOT)


def _map(elem: DataElement, fn: Callable[[str], str]) -> DataElement:
    values = [fn(v) if v else "" for v in (_strip(v) for v in _values(elem))]
    return _new(elem, values[0] if len(values) == 1 else (values or ""))


def _values(elem: DataElement) -> list[Any]:
    value = elem.value
    if value is None or value == "":
        return []
    return list(value) if elem.VM > 1 or isinstance(value, list) else [value]


def _text(elem: DataElement) -> str:
    return "\\".join(_strip(v) for v in _values(elem))


def _strip(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value).strip(" \x00")


_IMMUTABLE: Final = (str, int, float, bytes, PersonName)


def _new(elem: DataElement, value: Any, vr: str | None = None) -> DataElement:
    # Values were validated when read, replacements are valid by construction: warning again
    # for every copied element would only flood the workers' logs. Immutable values (and
    # lists of them, which DataElement copies into a new MultiValue) need no deep copy.
    if value is not None and not isinstance(value, _IMMUTABLE):
        if isinstance(value, list | MultiValue) and all(isinstance(v, _IMMUTABLE) for v in value):
            value = list(value)
        else:
            value = copy.deepcopy(value)
    return DataElement(elem.tag, vr or elem.VR, value, validation_mode=IGNORE)


def _keep(elem: DataElement) -> DataElement:
    """``elem`` itself when its value is immutable (shared with the input, which is never
    modified), else a copy; the elements :func:`_mark` sets are always copies."""
    if isinstance(elem.value, _IMMUTABLE) and int(elem.tag) not in _MARKED:
        return elem
    return _new(elem, elem.value)


def _dictionary(tag: int) -> tuple[str, str]:
    """Return the data dictionary's (VR, VM) of `tag`; ``("UN", "")`` for unknown tags."""
    try:
        vr, vm, *_ = get_entry(tag)
    except KeyError:
        return "UN", ""
    return vr, vm


_METHOD: Final = "voxlake Basic Profile (PS3.15 E.1.1)"


def _mark(out: Dataset, config: DeidConfig) -> None:
    codes = ["113100"]
    if config.date_mode == "shift" and config.max_date_shift_days == 0:
        codes.append("113106")
        temporal = "UNMODIFIED"
    elif config.date_mode in ("shift", "year"):
        codes.append("113107")
        temporal = "MODIFIED"
    else:
        temporal = "REMOVED"
    codes.append("113108")
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = _METHOD
    out.DeidentificationMethodCodeSequence = Sequence([_code_item(code) for code in codes])
    out.LongitudinalTemporalInformationModified = temporal
