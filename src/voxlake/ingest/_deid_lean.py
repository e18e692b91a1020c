"""De-identification's lean path: elements dropped or kept by their tag and VR alone, and
raw elements converted as ``Dataset.__getitem__`` would, without storing them back
(used by :mod:`voxlake.ingest.deid`; tests/ingest/test_deid_plan.py checks the plan)."""

from __future__ import annotations

import functools
from collections.abc import MutableSequence
from typing import TYPE_CHECKING, Final

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.hooks import hooks as _hooks
from pydicom.hooks import raw_element_value, raw_element_vr
from pydicom.values import convert_value

if TYPE_CHECKING:
    from voxlake.ingest.deid import _Context


from voxlake.ingest._deid_values import _DATE_VRS, _OVERLAYS, _PSEUDONYMIZED, _RULES, _bad_vr


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
