"""The lean path's per-tag plan decides exactly as _clean_element does, for every tag.

``_deid_lean._lean_plan`` drops or keeps an element by its tag and VR alone, without looking at
its value (and without converting it); everything else goes through ``_clean_element``.
Here every public tag of pydicom's dictionary and of the profile table, with its own VR
and with VRs that contradict it, is checked against ``_clean_element`` on several values.
"""

from __future__ import annotations

import pytest
from pydicom.config import IGNORE
from pydicom.datadict import DicomDictionary, dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from voxlake.config import DeidConfig
from voxlake.ingest import _deid_lean as lean
from voxlake.ingest import _deid_values as values
from voxlake.ingest import deid
from voxlake.ingest.deid import Pseudonymizer

from ..conftest import SECRET

#: Sample values per VR: a plain one, one a rule could map (well-known UID), and empty.
VALUES: dict[str, tuple[object, ...]] = {
    "AE": ("STATION1", ""),
    "AS": ("058Y", ""),
    "CS": ("ORIGINAL", ["ORIGINAL", "PRIMARY"], ""),
    "DA": ("20200315", ["20200315", "20210101"], "2020", ""),
    "DS": ("1.5", ["1.5", "-2"], ""),
    "DT": ("20200315101530.123456+0100", ""),
    "FD": (1.5, [1.5, 2.5]),
    "FL": (0.25,),
    "IS": ("12", ["1", "2"], ""),
    "LO": ("DOE HOSPITAL", ["A", "B"], ""),
    "LT": ("free text", ""),
    "PN": ("DOE^JANE", ""),
    "SH": ("SHORT", ""),
    "SL": (-7,),
    "SS": (-7, [1, -1]),
    "ST": ("short text", ""),
    "SV": (-7,),
    "TM": ("101530", "1015", ""),
    "UC": ("unlimited", ""),
    "UI": ("1.2.840.10008.5.1.4.1.1.2", "2.25.1234", ["1.2.3", "1.2.4"], ""),
    "UL": (7,),
    "UR": ("http://example.org/x", ""),
    "US": (7, [1, 2, 3]),
    "UT": ("unlimited text", ""),
    "UV": (7,),
}
#: VRs tried on every tag besides its own: the ones whose rules differ (dates, UIDs,
#: names) and plain ones.
OTHER_VRS = ("LO", "CS", "DA", "TM", "DT", "UI", "PN", "DS", "US")


def _tags() -> list[int]:
    tags = {tag for tag in DicomDictionary if not tag >> 16 & 1}
    tags |= {tag for tag in values._RULES if not tag >> 16 & 1}
    tags |= {0x00080000, 0x50000010, 0x60003000, 0x60004000, 0x60000010, 0x7FE00010}
    return sorted(tags)


def _vrs(tag: int) -> list[str]:
    try:
        own = [vr for vr in dictionary_VR(tag).split(" or ") if vr in lean._LEAN_VRS]
    except KeyError:
        own = []
    return sorted({*own, *OTHER_VRS})


@pytest.mark.parametrize("keep_descriptions", [True, False])
def test_plan_agrees_with_clean_element_for_every_tag(keep_descriptions: bool) -> None:
    config = DeidConfig(keep_descriptions=keep_descriptions)
    ctx = deid._context(
        Dataset(), {"PatientID": "PID1", "StudyInstanceUID": ""}, Pseudonymizer(SECRET), config
    )
    seen = {lean._DROP: 0, lean._KEEP: 0, lean._CLEAN: 0}
    for tag in _tags():
        for vr in _vrs(tag):
            plan = lean._lean_plan(tag, vr, keep_descriptions)
            seen[plan] += 1
            for value in VALUES[vr]:
                elem = DataElement(tag, vr, value, validation_mode=IGNORE)
                try:
                    expected = deid._clean_element(elem, ctx)
                except Exception:
                    expected = None  # _clean_dataset drops what raises
                where = f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {vr} {value!r}"
                if plan == lean._DROP:
                    assert expected is None, where
                elif plan == lean._KEEP:
                    assert expected is not None, where
                    assert (expected.VR, expected.value) == (vr, elem.value), where
    # every outcome occurs many times: the comparison above is not vacuous
    assert min(seen.values()) > 1000, seen
