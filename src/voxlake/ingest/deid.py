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
without building the de-identified dataset) are in :mod:`voxlake.ingest.header_json`. The
rules by tag and the value helpers (dates, UIDs, dummies, copies) are in
:mod:`voxlake.ingest._deid_values`, the tag-and-VR plan and the lean conversion of raw
elements in :mod:`voxlake.ingest._deid_lean`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Collection, Mapping, MutableSequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pydicom.config import IGNORE
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from voxlake.errors import ConfigError, SecretMissingError
from voxlake.ingest._deid_lean import (
    _DROP,
    _KEEP,
    _dropped_by_tag,
    _lean_conversion,
    _lean_element,
    _lean_plan,
    _lean_raw,
)
from voxlake.ingest._deid_values import (
    _ACCESSION,
    _DATE_VRS,
    _DUMMY,
    _PATIENT_ID,
    _PATIENT_NAME,
    _ROWS,
    _RULES,
    _TEXT_VRS,
    _bad_vr,
    _check_time,
    _dictionary,
    _is_bulk,
    _keep,
    _map,
    _mark,
    _mentions,
    _needles,
    _new,
    _shift,
    _text,
    _well_known,
    _year,
)
from voxlake.keys import keyed_hash

if TYPE_CHECKING:
    from voxlake.config import DeidConfig

__all__ = [
    "DESCRIPTION_KEYWORDS", "IDENTIFYING_KEYWORDS", "Pseudonymizer", "deidentify",
    "original_identifiers",
]  # fmt: skip


#: Keywords whose original values de-identification removes or replaces (UIDs, names, IDs,
#: dates, descriptions, ...). Catalog columns must never be filled from the *original* dataset
#: for these; the values in :func:`deidentify`'s output are pseudonyms, shifted dates or
#: descriptions the configuration chose to keep.
IDENTIFYING_KEYWORDS: Final[frozenset[str]] = frozenset(
    kw for _, kw, action, flags in _ROWS if action != "K" and "p" not in flags
)
#: Descriptors kept verbatim only when ``DeidConfig.keep_descriptions`` is set.
DESCRIPTION_KEYWORDS: Final[frozenset[str]] = frozenset(kw for _, kw, _, f in _ROWS if "c" in f)

_SEP: Final = "\x1f"
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


def original_identifiers(ds: Dataset, *, only: Collection[int] | None = None) -> dict[str, str]:
    """Return the raw identifiers the worker needs to compute keys (empty string when absent).

    Keys: PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, AccessionNumber,
    FrameOfReferenceUID (`only`: those of these tags). Use them in memory only; never store
    them.
    """
    out = {}
    encoding = ds.original_character_set if _lean_conversion() else ""
    for kw, tag in _ID_TAGS:
        if only is not None and tag not in only:
            continue
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
