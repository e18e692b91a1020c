"""The DICOM JSON model of de-identified headers, and the header pass's cleaner.

:func:`header_to_json` writes the DICOM JSON model (PS3.18 F) of a dataset
:func:`~voxlake.ingest.deid.deidentify` returned: compact, with sorted keys, bulk values
left out. It drops what JSON cannot carry (unparsable numbers) instead of raising.

The header pass uses :class:`HeaderCleaner`: the same JSON and column values, without building
the de-identified dataset, and once per distinct element of a batch rather than once per file.
The de-identification rules themselves are in :mod:`voxlake.ingest.deid`.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Mapping, MutableSequence
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Final, NamedTuple, cast

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from voxlake.ingest._deid_lean import _KEEP, _lean_plan, _lean_raw
from voxlake.ingest._deid_values import _MARKED, _PATIENT_ID, _PATIENT_NAME, _is_bulk, _mark, _new
from voxlake.ingest.deid import Pseudonymizer, _clean_one, _context, _lean_encoding
from voxlake.ingest.header_template import References

if TYPE_CHECKING:
    from voxlake.config import DeidConfig
    from voxlake.ingest.deid import _Context

__all__ = ["HeaderCleaner", "header_to_json"]


def header_to_json(ds: Dataset) -> str:
    """Return the DICOM JSON model (PS3.18 F) of a de-identified dataset, compact and sorted.

    Bulk values (pixel data, binary values over 1 KiB) are left out entirely; an element whose
    value cannot be represented (unparsable number, NaN) is dropped instead of raising.
    """
    try:
        # Nearly every header encodes whole: one dump, no per-element probe. Only when it
        # fails is each element probed (and the ones JSON cannot carry dropped).
        return _dumps(_json_dataset(ds, probe=False))
    except (TypeError, ValueError):
        return _dumps(_json_dataset(ds, probe=True))


class HeaderCleaner:
    """De-identifies the headers of a batch of files into what the catalog keeps of them.

    :meth:`clean` returns what :func:`header_to_json` writes of :func:`deidentify`'s
    result and what `values` makes of each of its elements, without building that dataset
    (nor its file meta group, which the JSON leaves out). Most of a header repeats from
    file to file of a series: an element met before with the same bytes (and the same
    character set and date shift) is not converted, de-identified or encoded again.

    Use one per batch of files, in one process, and drop it with the batch: what it
    remembers is keyed by original values (UIDs, dates) and never leaves it.

    Parameters
    ----------
    secret
        The keyed-hash secret; empty, :meth:`clean` raises :class:`SecretMissingError`.
    config
        De-identification options.
    values
        What the caller keeps of a de-identified element (``()`` for nothing); remembered
        with the element, so a function of the element alone.
    """

    __slots__ = ("_config", "_late_memo", "_memo", "_references", "_secret", "_values")

    def __init__(
        self,
        secret: str,
        config: DeidConfig,
        values: Callable[[DataElement], tuple[Any, ...]],
    ) -> None:
        self._secret = secret
        self._config = config
        self._values = values
        self._memo: dict[tuple[Any, ...], tuple[str | None, tuple[Any, ...]]] = {}
        self._late_memo: dict[tuple[Any, ...], list[_Encoded]] = {}
        self._references = References[_Cleaned]()

    def __repr__(self) -> str:
        return f"HeaderCleaner(secret=<hidden>, config={self._config!r})"

    def clean(
        self,
        ds: Dataset,
        identifiers: Mapping[str, str],
        *,
        reference: int | None = None,
        base: int | None = None,
        changed: frozenset[int] | None = None,
    ) -> tuple[str, list[Any]]:
        """Return the header JSON of the de-identified `ds` and the non-empty `values`.

        Parameters
        ----------
        ds
            The original header, as :func:`deidentify` takes it.
        identifiers
            ``original_identifiers(ds)``.
        reference, base, changed
            From the :class:`~voxlake.ingest.header_template.TemplateParser` that read
            `ds` (its ``generation``, ``base`` and ``changed``): `ds` is file number
            `reference`; with `changed`, it holds the elements of file number `base` but
            for the `changed` tags, and only those are cleaned again when that file's
            result is remembered (and the character set, date shift and searched
            identifiers are the same). The results of the last two numbered files are
            remembered: the template and the file next ones are compared with.
        """
        ctx = _context(ds, identifiers, Pseudonymizer(self._secret), self._config)
        encoding = _lean_encoding(ds, ctx)
        charset = encoding if isinstance(encoding, str) else tuple(encoding)
        days = ctx.offset.days
        fingerprint = (charset, days, ctx.needles)
        last = self._references.get(base) if changed is not None else None
        if (
            changed is not None
            and last is not None
            and last.fingerprint == fingerprint
            and _WHOLE.isdisjoint(changed)
            and not any(_is_creator(tag) for tag in changed)
        ):
            again = self._again(ds, last, changed, encoding, charset, ctx)
            if again is not None:
                self._keep(reference, base, fingerprint, again)
                return _joined(again)
        done: list[_Encoded] = []
        late: list[tuple[int, DataElement | RawDataElement, tuple[Any, ...] | None]] = []
        for tag, stored in sorted((int(key), stored) for key, stored in ds.items()):
            raw = _lean_raw(tag, stored) if encoding else None
            key = _memo_key(tag, stored, raw, charset, days)
            if tag in _LATE:  # set by the dataset as a whole: see _finish
                late.append((tag, stored, key))
                continue
            done.append((tag, *self._remembered(ds, tag, stored, raw, key, encoding, ctx)))
        done.extend(self._finish(ds, late, encoding, ctx))
        done.sort(key=itemgetter(0))
        self._keep(reference, base, fingerprint, done)
        return _joined(done)

    def _keep(
        self, reference: int | None, base: int | None, fingerprint: Any, done: list[_Encoded]
    ) -> None:
        if reference is not None and reference != base:  # a numbered file: remembered
            position = {tag: i for i, (tag, _, _) in enumerate(done) if tag not in _LATE}
            self._references.put(reference, _Cleaned(fingerprint, done, position))

    def _again(
        self,
        ds: Dataset,
        last: _Cleaned,
        changed: frozenset[int],
        encoding: str | MutableSequence[str],
        charset: Any,
        ctx: _Context,
    ) -> list[_Encoded] | None:
        """The encoded elements of `ds`, the file `last` was made of with other values in
        the `changed` tags (cleaned again, through the memo); None if a changed tag is
        not one of that file's."""
        done = list(last.done)
        for tag in changed:
            if tag >> 16 == 2:
                continue  # file meta: not in the JSON
            index = last.position.get(tag)
            if index is None:
                return None
            stored = ds.get_item(tag, keep_deferred=True)
            raw = _lean_raw(tag, stored) if encoding else None
            key = _memo_key(tag, stored, raw, charset, ctx.offset.days)
            done[index] = (tag, *self._remembered(ds, tag, stored, raw, key, encoding, ctx))
        return done

    def _remembered(
        self,
        ds: Dataset,
        tag: int,
        stored: DataElement | RawDataElement,
        raw: RawDataElement | None,
        key: tuple[Any, ...] | None,
        encoding: str | MutableSequence[str],
        ctx: _Context,
    ) -> tuple[str | None, tuple[Any, ...]]:
        """:meth:`_encoded`, through the memo when the element has a `key`."""
        found = self._memo.get(key) if key is not None else None
        if found is None:
            found = self._encoded(ds, tag, stored, raw, encoding, ctx)
            if key is not None:
                _remember(self._memo, key, found)
        return found

    def _finish(
        self,
        ds: Dataset,
        late: list[tuple[int, DataElement | RawDataElement, tuple[Any, ...] | None]],
        encoding: str | MutableSequence[str],
        ctx: _Context,
    ) -> list[_Encoded]:
        """PatientName, PatientID and the elements :func:`_mark` sets, as
        :func:`deidentify` sets them (remembered together when no mark is in the file)."""
        keys = tuple(key for _, _, key in late)
        marked = not _MARKED.isdisjoint(tag for tag, _, _ in late)
        known = None if marked or None in keys else keys
        if known is not None and known in self._late_memo:
            return self._late_memo[known]
        cleaned: dict[BaseTag, DataElement | RawDataElement] = {}
        for tag, stored, _ in late:
            raw = _lean_raw(tag, stored) if encoding else None
            new = _clean_one(ds, tag, stored, raw, encoding, ctx)
            if new is not None:
                cleaned[new.tag] = new
        out = Dataset(cleaned)
        if _PATIENT_NAME in out and _PATIENT_ID in out:
            out[_PATIENT_NAME].value = out[_PATIENT_ID].value
        if marked:  # set on the file's own elements
            _mark(out, self._config)
        done = _encode_dataset(out, self._values)
        if not marked:
            done.extend(_marks(self._config, self._values))
        if known is not None:
            _remember(self._late_memo, known, done)
        return done

    def _encoded(
        self,
        ds: Dataset,
        tag: int,
        stored: DataElement | RawDataElement,
        raw: RawDataElement | None,
        encoding: str | MutableSequence[str],
        ctx: _Context,
    ) -> tuple[str | None, tuple[Any, ...]]:
        """The JSON member and `values` of the de-identified element of `stored`."""
        if raw is not None and raw.VR in _NUMBER_VRS:
            numbers = _plain_numbers(raw)
            if (
                numbers is not None
                and _lean_plan(tag, raw.VR, self._config.keep_descriptions) == _KEEP
            ):
                value = numbers[0] if len(numbers) == 1 else numbers
                return _number_member(tag, raw.VR, numbers), self._values(
                    cast(DataElement, _Number(raw.tag, raw.VR, value))
                )
        return self._encode(_clean_one(ds, tag, stored, raw, encoding, ctx))

    def _encode(self, elem: DataElement | None) -> tuple[str | None, tuple[Any, ...]]:
        if elem is None:
            return None, ()
        return _json_member(elem), self._values(elem)


class _Number(NamedTuple):
    """A kept IS or DS element with plain numbers, as `values` reads it (``tag``, ``VR``
    and ``value``: the number, or a list of them, where pydicom's element holds the same
    numbers as IS, DSfloat or a MultiValue of them)."""

    tag: Any
    VR: str
    value: Any


#: Numbers written as text, whose plain values are converted without pydicom.
_NUMBER_VRS: Final = frozenset({"IS", "DS"})
_INTEGER: Final = re.compile(rb" *[-+]?[0-9]+ *")
_DECIMAL: Final = re.compile(rb" *[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)? *")


def _plain_numbers(raw: RawDataElement) -> list[int] | list[float] | None:
    """The values of an IS or DS element, when each is a plain, finite number no longer
    than the standard allows (12 and 16 characters), which pydicom reads without a
    warning; anything else, empty values and padding with NULs included, is left to it."""
    data = raw.value
    if not data:
        return None
    parts = data.split(b"\\")
    if raw.VR == "IS":
        if all(len(part) <= 12 and _INTEGER.fullmatch(part) for part in parts):
            return [int(part) for part in parts]
        return None
    if all(len(part) <= 16 and _DECIMAL.fullmatch(part) for part in parts):
        floats = [float(part) for part in parts]
        if all(math.isfinite(value) for value in floats):
            return floats
    return None


def _number_member(tag: int, vr: str, numbers: list[int] | list[float]) -> str:
    """``"GGGGEEEE":{"Value":[...],"vr":"DS"}`` as :func:`_json_member` writes it (json
    writes ints and finite floats with their ``repr``)."""
    return f'"{tag:08X}":{{"Value":[{",".join(map(repr, numbers))}],"vr":"{vr}"}}'


@dataclass(frozen=True, slots=True)
class _Cleaned:
    """What :meth:`HeaderCleaner.clean` made of a numbered file: the encoded elements in
    tag order and where each element of the file is among them (PatientName, PatientID
    and the marks left out: set by the dataset as a whole)."""

    fingerprint: tuple[Any, ...]
    done: list[_Encoded]
    position: dict[int, int]


def _joined(done: list[_Encoded]) -> tuple[str, list[Any]]:
    members = [member for _, member, _ in done if member is not None]
    return "{" + ",".join(members) + "}", [kept for _, _, kept in done if kept]


def _encode_dataset(
    ds: Dataset, values: Callable[[DataElement], tuple[Any, ...]]
) -> list[_Encoded]:
    elements = [ds[tag] for tag in ds.keys()]  # noqa: SIM118
    return [(int(elem.tag), _json_member(elem), values(elem)) for elem in elements]


@functools.lru_cache(maxsize=8)
def _marks(
    config: DeidConfig, values: Callable[[DataElement], tuple[Any, ...]]
) -> tuple[_Encoded, ...]:
    """The elements :func:`_mark` adds to a dataset that has none of them, encoded."""
    marks = Dataset()
    _mark(marks, config)
    return tuple(_encode_dataset(marks, values))


#: (tag, JSON member or None, values): one element as the cleaner returns it.
_Encoded = tuple[int, str | None, tuple[Any, ...]]


def _remember(memo: dict[Any, Any], key: tuple[Any, ...], value: Any) -> None:
    if len(memo) >= _MEMO_ENTRIES:
        memo.clear()  # bounded: a batch of unrelated files gains nothing from it anyway
    memo[key] = value


#: Elements set by the dataset as a whole (PatientName takes PatientID's value).
_LATE: Final = _MARKED | {_PATIENT_NAME, _PATIENT_ID}
#: What pydicom reads to decide an ambiguous VR (US or SS, OB or OW) while converting
#: another element: BitsAllocated, PixelRepresentation, LUTDescriptor and
#: WaveformBitsAllocated.
_VR_SOURCES: Final = frozenset({0x00280100, 0x00280103, 0x00283002, 0x54001004})
#: Changed, a file is cleaned whole, not from its reference's elements (so is a file
#: whose private creator changed: pydicom finds a private element's VR through it).
_WHOLE: Final = _LATE | _VR_SOURCES


def _is_creator(tag: int) -> bool:
    return bool(tag >> 16 & 1) and 0x10 <= tag & 0xFFFF <= 0xFF


_MEMO_ENTRIES: Final = 1 << 15
_MEMO_BYTES: Final = 256


def _memo_key(
    tag: int,
    stored: DataElement | RawDataElement,
    raw: RawDataElement | None,
    charset: Any,
    days: int,
) -> tuple[Any, ...] | None:
    """What the de-identified element depends on, or None: not remembered.

    The tag, VR and stored value (bytes with their byte order and character set, or a
    converted string), and the date shift. Private elements also depend on the patient's
    own identifiers (searched for in them) and are left out, as are long values.
    """
    if raw is not None:  # lean
        data = raw.value
        if data is None or len(data) > _MEMO_BYTES:
            return None
        return (tag, raw.VR, data, raw.is_little_endian, charset, days)
    if isinstance(stored, DataElement) and not tag & 0x10000:
        value = stored.value
        if isinstance(value, str) and len(value) <= _MEMO_BYTES:
            return (tag, stored.VR, value, type(value), days)
    return None


#: What ``json.dumps(..., ensure_ascii=False, separators=(",", ":"), sort_keys=True,
#: allow_nan=False)`` builds on every call (it holds no state between calls).
_ENCODER: Final = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
)


def _dumps(model: dict[str, Any]) -> str:
    return _ENCODER.encode(model)


def _json_dataset(ds: Dataset, *, probe: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # In storage order: the keys are sorted when the model is dumped.
    for stored in list(ds.values()):
        tag = int(stored.tag)
        try:
            if _is_bulk(stored):
                continue
            elem = stored if isinstance(stored, DataElement) else ds[tag]
            entry = _json_entry(elem, probe=probe)
            if probe and elem.VR != "SQ":
                json.dumps(entry, allow_nan=False)  # drop what JSON cannot carry
        except Exception:  # never raise on odd values: the element is left out
            continue
        out[f"{tag:08X}"] = entry
    return out


def _json_entry(elem: DataElement, *, probe: bool) -> dict[str, Any]:
    if elem.VR == "SQ":
        items = [_json_dataset(item, probe=probe) for item in elem.value]
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
    return _json_element(elem)


def _json_member(elem: DataElement) -> str | None:
    """``"GGGGEEEE":{...}``, `elem` as :func:`header_to_json` writes it in its dataset.

    None when it is left out there. The model is a JSON object with sorted keys, so
    joining the members of a dataset's elements in tag order writes what it writes.
    """
    try:
        if _is_bulk(elem):
            return None
        entry = _json_entry(elem, probe=False)
    except Exception:  # never raise on odd values: the element is left out
        return None
    key = f"{int(elem.tag):08X}"
    try:
        return _dumps({key: entry})[1:-1]
    except (TypeError, ValueError):
        if elem.VR != "SQ":
            return None  # what the probe drops
        return _dumps({key: _json_entry(elem, probe=True)})[1:-1]


_JSON_TEXT_VRS: Final = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
_JSON_INT_VRS: Final = frozenset({"IS", "SL", "SS", "SV", "UL", "US", "UV"})
_JSON_FLOAT_VRS: Final = frozenset({"DS", "FD", "FL"})


def _json_element(elem: DataElement) -> dict[str, Any]:
    """``elem.to_json_dict(None, 0)`` for the common text and number values, faster.

    Anything else (names, binary, tags, ambiguous VRs, single-item lists) goes through
    pydicom, so the output is the same as pydicom's for every element.
    """
    vr, value = elem.VR, elem.value
    kind = type(value)
    if vr in _JSON_TEXT_VRS:
        if isinstance(value, str):
            return {"vr": vr, "Value": [value]} if value else {"vr": vr}
        if value is None:
            return {"vr": vr}
    elif vr in _JSON_INT_VRS or vr in _JSON_FLOAT_VRS:
        number = int if vr in _JSON_INT_VRS else float
        if value is None or (isinstance(value, str) and not value):
            return {"vr": vr}
        if isinstance(value, int | float) and kind is not bool:
            return {"vr": vr, "Value": [number(value)]}
    if isinstance(value, MultiValue) and len(value) > 1 and " or " not in vr:
        if vr in _JSON_TEXT_VRS:
            return {"vr": vr, "Value": list(value)}
        if vr in _JSON_INT_VRS or vr in _JSON_FLOAT_VRS:
            number = int if vr in _JSON_INT_VRS else float
            return {"vr": vr, "Value": [number(v) if v is not None else None for v in value]}
    return _resolve_ambiguous(elem).to_json_dict(None, 0)


def _resolve_ambiguous(elem: DataElement) -> DataElement:
    # Ambiguous VRs survive when the dataset lacks what pydicom needs to decide (e.g. no
    # PixelRepresentation); the JSON model needs a single VR.
    if " or " not in elem.VR:
        return elem
    value = elem.value
    if isinstance(value, bytes):
        vr = "OW" if "OW" in elem.VR else "OB"
    else:
        ints = list(value) if elem.VM > 1 else [value]
        vr = "SS" if any(v is not None and v < 0 for v in ints) else "US"
    return _new(elem, value, vr)
