"""De-identification of DICOM headers (PS3.15 Annex E, Basic Application Confidentiality Profile).

:func:`deidentify` runs on the Dask workers on every header before anything reaches the catalog.
It returns a new dataset (the input is left as it was) in which

* the actions of PS3.15 Table E.1-1 (:mod:`voxlake.ingest._deid_table`) are applied to every
  attribute, in every item of every sequence. Combined codes take the choice with the least
  information: ``X/Z``, ``Z/D`` and ``X/Z/D`` empty the value, ``X/D`` writes a dummy, ``X/Z/U*``
  keeps the references with their UIDs replaced. ``D`` on a sequence empties it: a dummy item
  could only be invented, and the items (content trees, person codes) hold free text;
* PatientID and PatientName become ``Pseudonymizer.key("patient", PatientID)``; AccessionNumber
  the first 16 characters of ``key("accession", ...)`` (its VR, SH, holds 16). Instance UIDs
  become ``Pseudonymizer.uid(original)``, so references between instances still match; any other
  UID that is not well known (``1.2.840.10008.`` root, class and transfer-syntax attributes) is
  replaced too;
* dates follow ``DeidConfig.date_mode``: ``"shift"`` moves every DA and the date part of every DT
  by the offset of the original PatientID (of the study when there is none); times of day are
  kept: they do not identify without the date; ``"year"`` writes ``YYYY0101`` and empties
  times; ``"remove"`` empties or drops them. PatientBirthDate is always emptied (the profile has
  no option keeping it); PatientAge stays;
* patient characteristics (age, sex, size, weight, ...) are kept (Retain Patient
  Characteristics Option); acquisition and series descriptors are kept verbatim when
  ``keep_descriptions`` is set (no cleaning is attempted, so the Clean Descriptors Option is not
  claimed); free text about the patient is always removed;
* private elements are dropped unless ``keep_private_tags`` (kept ones still get the date and UID
  rules, and those repeating the patient's own ID or name are dropped); curves (``50xx``),
  overlay data and comments (``60xx,3000``/``60xx,4000``), pixel data and other bulk values
  (binary VRs over 1 KiB) are dropped; person names the table does not list are emptied.

Values that cannot be handled (invalid dates or times, several values where the dictionary allows
one, a VR that contradicts the dictionary for a date, time, UID or name, public elements pydicom
left as UN) drop their element: nothing here raises on data.

The JSON model of the result (:func:`~voxlake.ingest.header_json.header_to_json`) and the header
pass's :class:`~voxlake.ingest.header_json.HeaderCleaner` (the same JSON and column values
without building the de-identified dataset) are in :mod:`voxlake.ingest.header_json`.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import functools
import re
from collections.abc import Callable, Mapping, MutableSequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from pydicom.config import IGNORE
from pydicom.datadict import get_entry, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.hooks import hooks as _hooks
from pydicom.hooks import raw_element_value, raw_element_vr
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName
from pydicom.values import convert_value

from voxlake.errors import ConfigError, SecretMissingError
from voxlake.ingest import _deid_table as _table
from voxlake.keys import keyed_hash

if TYPE_CHECKING:
    from voxlake.config import DeidConfig

__all__ = [
    "DESCRIPTION_KEYWORDS", "IDENTIFYING_KEYWORDS", "Pseudonymizer", "deidentify",
    "original_identifiers",
]  # fmt: skip

_COMBINED: Final = {"X/Z": "Z", "Z/D": "Z", "X/Z/D": "Z", "X/D": "D", "X/Z/U*": "U*"}.get
_ROWS: Final = (*_table.BASIC_PROFILE, *_table.VOXLAKE_ADDITIONS)
#: tag -> (resolved action, option flags)
_RULES: Final[Mapping[int, tuple[str, str]]] = MappingProxyType(
    {tag: (_COMBINED(action, action), flags) for tag, _, action, flags in _ROWS}
)

#: Keywords whose original values de-identification removes or replaces (UIDs, names, IDs,
#: dates, descriptions, ...). Catalog columns must never be filled from the *original* dataset
#: for these; the values in :func:`deidentify`'s output are pseudonyms, shifted dates or
#: descriptions the configuration chose to keep.
IDENTIFYING_KEYWORDS: Final[frozenset[str]] = frozenset(
    kw for _, kw, action, flags in _ROWS if action != "K" and "p" not in flags
)
#: Descriptors kept verbatim only when ``DeidConfig.keep_descriptions`` is set.
DESCRIPTION_KEYWORDS: Final[frozenset[str]] = frozenset(kw for _, kw, _, f in _ROWS if "c" in f)

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
_SEP: Final = "\x1f"
_DA_RE: Final = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")
_DT_RE: Final = re.compile(r"(\d{4})(\d{2})(\d{2})((?:\d{2}){0,3}(?:\.\d{1,6})?(?:[+-]\d{4})?)")
_DT_YEAR_RE: Final = re.compile(r"(\d{4})[\d.]*(?:[+-]\d{4})?")
_TM_RE: Final = re.compile(r"\d{2}(?::?\d{2}(?::?\d{2}(?:\.\d{1,6})?)?)?")
_METHOD: Final = "voxlake Basic Profile (PS3.15 E.1.1)"
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
_ID_KEYWORDS: Final = (
    "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "AccessionNumber",
    "FrameOfReferenceUID",
)  # fmt: skip
_ID_TAGS: Final = tuple((kw, tag_for_keyword(kw) or 0) for kw in _ID_KEYWORDS)


class Pseudonymizer:
    """Keyed pseudonyms: HMAC-SHA256 of the secret over ``kind + "\\x1f" + value`` (128 bits).

    Deterministic for a given secret, so the same patient, study or UID gets the same
    pseudonym on every worker and in every run; without the secret they cannot be reversed or
    recomputed. Picklable (Dask ships it to workers); ``repr`` never shows the secret.

    Parameters
    ----------
    secret
        The keyed-hash secret (``IngestConfig.require_secret()``).

    Raises
    ------
    SecretMissingError
        If `secret` is empty.
    """

    __slots__ = ("_secret",)

    def __init__(self, secret: str) -> None:
        if not secret:
            raise SecretMissingError(
                "de-identification secret is empty",
                hint="set VOXLAKE_SECRET or pass --secret; keep it out of the catalog and code",
            )
        self._secret = secret

    def __repr__(self) -> str:
        return "Pseudonymizer(secret=<hidden>)"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Pseudonymizer, (self._secret,))

    def key(self, kind: str, value: str) -> str:
        """Return the 32-hex-character pseudonym of `value` in the domain `kind`.

        `kind` (``"patient"``, ``"study"``, ``"series"``, ``"instance"``, ``"accession"``, ...)
        separates domains: equal strings of different kinds get unrelated keys. The same
        function as :func:`voxlake.keys.keyed_hash`, so header pseudonyms equal catalog keys.

        Raises
        ------
        ConfigError
            If `kind` is empty or contains the separator (domains would overlap).
        """
        if not kind or _SEP in kind:
            raise ConfigError("pseudonym kind must be non-empty and free of the unit separator")
        return keyed_hash(self._secret, kind, value)

    def uid(self, value: str) -> str:
        """Return the replacement UID of `value`: ``2.25.<128-bit integer>`` (at most 44 chars)."""
        return f"2.25.{int(self.key('uid', value), 16)}"

    def date_offset_days(self, patient_id: str, max_days: int) -> int:
        """Return the patient's date shift in days: in ``[-max_days, max_days]``, never 0 if > 0.

        Raises
        ------
        ConfigError
            If `max_days` is negative.
        """
        if max_days < 0:
            raise ConfigError("max_date_shift_days must not be negative", max_days=max_days)
        if max_days == 0:
            return 0
        n = int(self.key("date_offset", patient_id)[:16], 16) % (2 * max_days)
        return n - max_days if n < max_days else n - max_days + 1


@dataclass(frozen=True)
class _Context:
    pseudonymizer: Pseudonymizer
    config: DeidConfig
    offset: dt.timedelta
    needles: tuple[str, ...]  # the patient's own IDs and names, upper case
    lean: bool  # raw elements may be converted here (pydicom's conversion hooks unchanged)


def original_identifiers(ds: Dataset) -> dict[str, str]:
    """Return the raw identifiers the worker needs to compute keys (empty string when absent).

    Keys: PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, AccessionNumber,
    FrameOfReferenceUID. Use them in memory only; never store them.
    """
    out = {}
    encoding = ds.original_character_set if _lean_conversion() else ""
    for kw, tag in _ID_TAGS:
        try:
            if tag not in ds:
                out[kw] = ""
                continue
            raw = _lean_raw(tag, ds.get_item(tag, keep_deferred=True)) if encoding else None
            out[kw] = _text(ds[tag] if raw is None else _lean_element(raw, encoding))
        except Exception:  # odd value: treat as absent rather than fail the file
            out[kw] = ""
    return out


def deidentify(ds: Dataset, *, pseudonymizer: Pseudonymizer, config: DeidConfig) -> Dataset:
    """Return a de-identified copy of `ds` (see the module documentation for the rules).

    Parameters
    ----------
    ds
        The original header; it is not modified. Pixel data and bulk values are not copied.
        Elements dropped by their tag alone (private ones, group lengths, curves,
        overlays, "X" actions) are never converted from their raw bytes; kept elements
        with immutable values are shared with `ds`, not copied.
    pseudonymizer
        Computes keys, replacement UIDs and the per-patient date offset.
    config
        De-identification options.

    Returns
    -------
    pydicom.Dataset
        A new dataset with PatientIdentityRemoved, DeidentificationMethod,
        DeidentificationMethodCodeSequence and LongitudinalTemporalInformationModified set.
    """
    ctx = _context(ds, original_identifiers(ds), pseudonymizer, config)
    out = _clean_dataset(ds, ctx)
    meta = getattr(ds, "file_meta", None)
    if isinstance(meta, Dataset):
        with contextlib.suppress(Exception):  # a malformed file meta group is left out
            out.file_meta = FileMetaDataset(_clean_dataset(meta, ctx))
    _mark(out, config)
    return out


def _context(
    ds: Dataset, ids: Mapping[str, str], pseudonymizer: Pseudonymizer, config: DeidConfig
) -> _Context:
    days = 0
    if config.date_mode == "shift":
        # Without a PatientID the study is the unit whose intervals are preserved.
        anchor = ids["PatientID"] or ids["StudyInstanceUID"]
        days = pseudonymizer.date_offset_days(anchor, config.max_date_shift_days)
    # Only kept private elements are searched for the patient's own identifiers.
    needles = _needles(ds) if config.keep_private_tags else ()
    return _Context(pseudonymizer, config, dt.timedelta(days=days), needles, _lean_conversion())


def _clean_dataset(src: Dataset, ctx: _Context) -> Dataset:
    plain: dict[BaseTag, DataElement | RawDataElement] = {}  # the output's, as they are
    linked: list[DataElement] = []  # private and SQ: added by Dataset.add (creators, items)
    encoding = _lean_encoding(src, ctx)
    # The stored (raw or converted) elements in tag order (private creators before their
    # blocks); plain ints compare much faster than Tags.
    for tag, stored in sorted((int(key), stored) for key, stored in src.items()):
        raw = _lean_raw(tag, stored) if encoding else None
        new = _clean_one(src, tag, stored, raw, encoding, ctx)
        if new is None:
            continue
        if new.VR == "SQ" or tag & 0x10000:
            linked.append(new)
        else:
            plain[new.tag] = new
    out = Dataset(plain)
    for new in linked:
        out.add(new)
    if _PATIENT_NAME in out and _PATIENT_ID in out:
        out[_PATIENT_NAME].value = out[_PATIENT_ID].value
    return out


def _lean_encoding(src: Dataset, ctx: _Context) -> str | MutableSequence[str]:
    """The encoding :func:`_clean_lean` decodes `src`'s text with; empty: no lean path.

    The one ``Dataset.__getitem__`` uses once the dataset's character set is read.
    """
    return src.original_character_set if ctx.lean else ""


def _lean_raw(tag: int, stored: DataElement | RawDataElement) -> RawDataElement | None:
    """`stored` when :func:`_clean_lean` may convert it, else None.

    An explicit-VR, public, non-sequence raw element of a VR that needs no dictionary
    lookup or ambiguity resolution; anything else goes through ``Dataset.__getitem__``.
    """
    if (
        isinstance(stored, RawDataElement)
        and stored.VR in _LEAN_VRS  # not implicit VR (None), UN, SQ, binary, ambiguous
        and not tag & 0x10000  # private: the creator is looked up
        and stored.value is not None  # deferred
        and tag not in _SPECIAL_TAGS
    ):
        return stored
    return None


def _clean_lean(
    tag: int, raw: RawDataElement, encoding: str | MutableSequence[str], ctx: _Context
) -> DataElement | None:
    """:func:`_clean_element` of ``src[tag]`` for a raw element :func:`_lean_raw` accepts.

    Converted as ``Dataset.__getitem__`` converts it (the same ``convert_value`` and the
    same ``DataElement``), without storing it back in the source, and only when it is not
    dropped; the element is fresh, shared with nothing, so a kept one is kept as it is.
    """
    try:
        plan = _lean_plan(tag, raw.VR or "", ctx.config.keep_descriptions)
        if plan == _DROP:
            return None
        elem = _lean_element(raw, encoding)
        return elem if plan == _KEEP else _clean_element(elem, ctx)
    except Exception:  # never raise on odd values: the element is dropped
        return None


def _lean_element(raw: RawDataElement, encoding: str | MutableSequence[str]) -> DataElement:
    """``src[tag]`` of a raw element :func:`_lean_raw` accepts, not stored back in ``src``.

    `encoding`: ``src.original_character_set`` (what ``Dataset.__getitem__`` decodes with).
    """
    vr = raw.VR or ""  # never implicit here
    return DataElement(
        raw.tag,
        vr,
        convert_value(vr, raw, encoding),
        raw.value_tell,
        raw.length == 0xFFFFFFFF,
        already_converted=True,
    )


def _clean_one(
    src: Dataset,
    tag: int,
    stored: DataElement | RawDataElement,
    raw: RawDataElement | None,
    encoding: str | MutableSequence[str],
    ctx: _Context,
) -> DataElement | None:
    """The de-identified element of `stored` (``raw``: ``_lean_raw(tag, stored)``)."""
    if raw is not None:
        return _clean_lean(tag, raw, encoding, ctx)
    return _clean_stored(src, tag, stored, ctx)


def _clean_stored(
    src: Dataset, tag: int, raw: DataElement | RawDataElement, ctx: _Context
) -> DataElement | None:
    """:func:`_clean_element` of ``src[tag]``, unless its tag alone drops it."""
    try:
        if _is_bulk(raw) or _dropped_by_tag(tag, ctx):
            return None  # decided by the tag alone: the value is never converted
        return _clean_element(src[tag], ctx)
    except Exception:  # never raise on odd values: the element is dropped
        return None


def _dropped_by_tag(tag: int, ctx: _Context) -> bool:
    """True for elements :func:`_clean_element` drops whatever their VR and value."""
    group, element = tag >> 16, tag & 0xFFFF
    if element == 0:
        return True
    if group & 1:  # private (odd 50xx and 60xx groups too): only the option decides
        return not ctx.config.keep_private_tags
    if group >> 8 == 0x50 or group == 0x7FE0 or (group >> 8 == 0x60 and element in _OVERLAYS):
        return True
    rule = _RULES.get(tag)
    if rule is None or tag in _PSEUDONYMIZED:
        return False
    action, flags = rule  # "X" drops unless a flag or an option keeps or maps the value
    kept = "p" in flags or "d" in flags or ("c" in flags and ctx.config.keep_descriptions)
    return action == "X" and not kept


_DROP: Final = 0
_KEEP: Final = 1
_CLEAN: Final = 2


@functools.lru_cache(maxsize=16384)
def _lean_plan(tag: int, vr: str, keep_descriptions: bool) -> int:
    """What :func:`_clean_element` does with a public, non-sequence element of this tag and
    VR (not UN): ``_DROP`` it or ``_KEEP`` it as it is, whatever its value, or ``_CLEAN``:
    the value decides (dates, UIDs, names, pseudonyms, dummies), so ask it.

    The same decisions in the same order, by tag and VR alone: decided once per tag and VR,
    not once per element (tests/ingest/test_deid_plan.py checks every dictionary tag).
    """
    group, element = tag >> 16, tag & 0xFFFF
    if element == 0 or group >> 8 == 0x50 or group == 0x7FE0:
        return _DROP
    if group >> 8 == 0x60 and element in _OVERLAYS:
        return _DROP
    if tag in _PSEUDONYMIZED:
        return _CLEAN
    rule = _RULES.get(tag)
    if rule is not None:
        action, flags = rule
        if action == "K" or "p" in flags:
            return _KEEP
        if not ("c" in flags and keep_descriptions):
            if "d" in flags and vr in _DATE_VRS:
                return _CLEAN
            return _DROP if action == "X" else _CLEAN
    # _clean_generic of a public element
    if _bad_vr(tag, vr):
        return _DROP
    if vr in _DATE_VRS or vr == "UI" or vr == "PN":
        return _CLEAN
    return _KEEP


#: VRs converted here as Dataset.__getitem__ converts them (no dictionary lookup, no
#: ambiguity to resolve, no nested dataset): numbers, plain and character-set text.
_LEAN_VRS: Final = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN", "SH", "SL", "SS",
     "ST", "SV", "TM", "UC", "UI", "UL", "UR", "US", "UT", "UV"}
)  # fmt: skip
#: Converted through Dataset.__getitem__ whatever their VR: SpecificCharacterSet (read
#: with the default encoding) and the LUT descriptors (pydicom fixes their first value).
_SPECIAL_TAGS: Final = frozenset({0x00080005, 0x00281101, 0x00281102, 0x00281103, 0x00283002})


def _lean_conversion() -> bool:
    """True when pydicom converts raw elements with its default hooks (nobody changed them)."""
    from pydicom import config

    return (
        config.data_element_callback is None
        and not _hooks.raw_element_kwargs
        and _hooks.raw_element_vr is raw_element_vr
        and _hooks.raw_element_value is raw_element_value
    )


def _clean_element(elem: DataElement, ctx: _Context) -> DataElement | None:
    tag = int(elem.tag)
    group, element = tag >> 16, tag & 0xFFFF
    if element == 0:  # group lengths are stale once elements are removed
        return None
    if group & 1:  # private
        return _clean_generic(elem, ctx) if ctx.config.keep_private_tags else None
    if elem.VR == "UN":  # a public attribute pydicom could not interpret cannot be vetted
        return None
    if group >> 8 == 0x50 or group == 0x7FE0:
        return None
    if group >> 8 == 0x60 and element in (0x3000, 0x4000):
        return None
    if tag == _PATIENT_NAME:  # set to the PatientID key by _clean_dataset
        return _new(elem, "")
    if tag in (_PATIENT_ID, _ACCESSION):
        value, kind = _text(elem), "patient" if tag == _PATIENT_ID else "accession"
        key = ctx.pseudonymizer.key(kind, value) if value else ""
        return _new(elem, key if tag == _PATIENT_ID else key[:16])  # SH holds 16 characters
    rule = _RULES.get(tag)
    if rule is None:
        return _clean_generic(elem, ctx)
    action, flags = rule
    if action == "K" or "p" in flags:
        return _clean_generic(elem, ctx) if elem.VR == "SQ" else _keep(elem)
    if "c" in flags and ctx.config.keep_descriptions:
        return _clean_generic(elem, ctx)
    if "d" in flags and elem.VR in _DATE_VRS:
        return _clean_date(elem, ctx, action)
    return _apply(elem, action, ctx)


def _apply(elem: DataElement, action: str, ctx: _Context) -> DataElement | None:
    if action == "Z" or (action == "D" and elem.VR == "SQ"):
        return _new(elem, Sequence() if elem.VR == "SQ" else empty_value_for_VR(elem.VR))
    if action == "D":
        return _dummy(elem, ctx)
    if action == "U":
        return _map(elem, ctx.pseudonymizer.uid)
    if action == "U*":
        return _clean_generic(elem, ctx)
    return None  # "X", and any action this module does not know: fail closed


def _clean_generic(elem: DataElement, ctx: _Context) -> DataElement | None:
    vr = elem.VR
    if elem.tag.is_private and vr != "SQ" and _mentions(elem, ctx.needles):
        return None
    if vr == "SQ":
        items = Sequence([_clean_dataset(item, ctx) for item in elem.value])
        return DataElement(elem.tag, "SQ", items, validation_mode=IGNORE)
    if _bad_vr(int(elem.tag), vr) or (vr == "UN" and not elem.tag.is_private):
        return None
    if vr in _DATE_VRS:
        return _clean_date(elem, ctx, None)
    if vr == "UI":
        return _map(elem, lambda v: v if _well_known(elem.tag, v) else ctx.pseudonymizer.uid(v))
    if vr == "PN":  # names the table does not list
        return _new(elem, "")
    return _keep(elem)


def _clean_date(elem: DataElement, ctx: _Context, action: str | None) -> DataElement | None:
    vr, mode = elem.VR, ctx.config.date_mode
    if elem.VM > 1 and _dictionary(elem.tag)[1] == "1":
        return None
    if mode == "shift":
        if vr == "TM":
            return _map(elem, _check_time)
        return _map(elem, lambda v: _shift(v, vr, ctx.offset))
    if mode == "year" and vr != "TM":
        return _map(elem, lambda v: _year(v, vr))
    return None if action == "X" else _new(elem, "")


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


def _dummy(elem: DataElement, ctx: _Context) -> DataElement:
    vr = elem.VR
    if vr in _TEXT_VRS:
        return _new(elem, _DUMMY)
    if vr in ("IS", "DS"):
        return _new(elem, "0")
    if vr in ("US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"):
        return _new(elem, 0)
    if vr == "UI":
        return _map(elem, ctx.pseudonymizer.uid)
    return _new(elem, empty_value_for_VR(vr))


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
