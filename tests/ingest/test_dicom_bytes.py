"""Parsing DICOM bytes with pydicom: a recursion bomb fails its file and nothing else."""

from __future__ import annotations

import gc
import io
import struct
import sys
from typing import Any

import pydicom
import pydicom.filereader
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from voxlake.errors import NotDicomError
from voxlake.ingest.dicom_bytes import parse_dicom_bytes


def _nested_bomb(depth: int) -> bytes:
    """A small explicit-VR file with sequences nested ``depth`` deep, undefined lengths."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
    ds.Modality, ds.PatientID = "CT", "P1"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    meta_end = 144 + struct.unpack("<I", data[140:144])[0]
    open_sq = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff"
    close_sq = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return data[:meta_end] + open_sq * depth + close_sq * depth + data[meta_end:]


class _Garbage:
    """Cyclic garbage (``g.me = g``) whose finalizer needs a little stack.

    No ``__init__``: made at the recursion limit, a Python constructor could fail before
    its cycle exists, and the object would then be freed on the spot, finalizer and all,
    with no collection involved (what Python 3.13 does under pytest)."""

    me: _Garbage

    def __del__(self) -> None:
        def down(n: int) -> int:
            return 0 if n == 0 else down(n - 1)

        down(30)


def test_a_recursion_bomb_runs_no_finalizer_at_the_recursion_limit(monkeypatch) -> None:
    # Garbage with finalizers is made at every nesting level, and a collection may run at
    # every allocation: without the pause, finalizers would run at the recursion limit,
    # fail and be reported as unraisable (what failed a CI run once, under a full suite).
    reported: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    read_item = pydicom.filereader.read_sequence_item

    def with_garbage(*args: Any, **kwargs: Any) -> Any:
        garbage = _Garbage()
        garbage.me = garbage  # no Python call: nothing here can fail at the limit
        del garbage
        return read_item(*args, **kwargs)

    monkeypatch.setattr(pydicom.filereader, "read_sequence_item", with_garbage)
    threshold = gc.get_threshold()
    gc.set_threshold(1)
    try:
        with pytest.raises(NotDicomError) as info:
            parse_dicom_bytes(_nested_bomb(3000), max_bytes=1 << 24)
    finally:
        gc.set_threshold(*threshold)
    assert info.value.code == "bad_header"
    assert gc.isenabled()  # the collector runs again afterwards
    gc.collect()  # the garbage made meanwhile is collected, at a normal depth
    assert reported == []


def test_moderate_nesting_still_parses() -> None:
    ds, gzipped = parse_dicom_bytes(_nested_bomb(20), max_bytes=1 << 24)
    assert not gzipped and ds.Modality == "CT"
    depth, item = 0, ds
    while "ReferencedSeriesSequence" in item:
        item, depth = item.ReferencedSeriesSequence[0], depth + 1
    assert depth == 20
