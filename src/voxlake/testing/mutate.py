"""Byte-level mutators for fuzzing DICOM readers.

They work on raw bytes, so they can break what pydicom would refuse to write: lengths,
VRs, delimiters, the preamble. :func:`element_spans` finds where each top-level element
lies; :func:`flip_bits`, :func:`truncate`, :func:`delete_element` and
:func:`replace_value` are pure functions of their arguments (hypothesis draws those);
:func:`mutate` picks one at random for long fuzz runs (``benchmarks/fuzz.py``), and
:func:`run_stages` takes files through the ingest stages in one process.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import numpy as np

__all__ = [
    "HOSTILE_VALUES",
    "ElementSpan",
    "StageRun",
    "delete_element",
    "element_spans",
    "flip_bits",
    "mutate",
    "replace_value",
    "run_stages",
    "truncate",
]

#: Values written by :func:`replace_value`: empty, zero, negative, huge, not numbers,
#: NaN and infinities, control bytes, many values, overlong.
HOSTILE_VALUES: tuple[bytes, ...] = (
    b"",
    b"0 ",
    b"-1",
    b"65535 ",
    b"4294967295",
    b"NaN ",
    b"inf ",
    b"-inf",
    b"1e308 ",
    b"abc ",
    b"\xff\xfe",
    b"\x00\x00",
    b"\x00\x00\x00\x00",
    b"\xff\xff\xff\xff",
    b"1\\2\\3\\4\\5\\6\\7\\8 ",
    b"A" * 1024,
)

# Explicit VRs whose length field is 4 bytes (after 2 reserved bytes), PS3.5 7.1.2.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


@dataclass(frozen=True)
class ElementSpan:
    """Where one top-level element lies in a file's bytes.

    ``start`` is the first byte of its tag, ``value`` the first byte of its value, ``end``
    one past its last byte; ``length_at`` and ``length_size`` locate its length field.
    """

    tag: int
    start: int
    value: int
    end: int
    length_at: int
    length_size: int


def element_spans(data: bytes) -> list[ElementSpan]:
    """The top-level elements of DICOM bytes (file meta included) of defined length.

    Elements of undefined length (sequences, encapsulated pixel data) are left out; bytes
    pydicom cannot parse at all give an empty list.
    """
    import pydicom
    from pydicom.dataelem import RawDataElement

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:
        return []
    spans: list[ElementSpan] = []
    for group in (getattr(ds, "file_meta", None), ds):
        if group is None:
            continue
        for elem in group._dict.values():
            if not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF:
                continue
            value = int(elem.value_tell)
            if elem.is_implicit_VR and group is ds:
                start, length_at, size = value - 8, value - 4, 4
            elif data[value - 8 : value - 6] in _LONG_VRS:
                start, length_at, size = value - 12, value - 4, 4
            else:
                start, length_at, size = value - 8, value - 2, 2
            end = value + int(elem.length)
            if start >= 0 and end <= len(data):
                spans.append(ElementSpan(int(elem.tag), start, value, end, length_at, size))
    return sorted(spans, key=lambda s: s.start)


def flip_bits(data: bytes, positions: Sequence[int]) -> bytes:
    """``data`` with the bits at ``positions`` (bit indices, modulo the size) flipped."""
    if not data:
        return data
    out = bytearray(data)
    for bit in positions:
        bit %= len(out) * 8
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def truncate(data: bytes, keep: int) -> bytes:
    """The first ``keep`` bytes (``keep`` modulo the size plus one)."""
    return data[: keep % (len(data) + 1)]


def delete_element(data: bytes, which: int) -> bytes:
    """``data`` without its ``which``-th top-level element (modulo their number)."""
    spans = element_spans(data)
    if not spans:
        return data
    span = spans[which % len(spans)]
    return data[: span.start] + data[span.end :]


def replace_value(data: bytes, which: int, payload: bytes) -> bytes:
    """``data`` with the value of its ``which``-th top-level element replaced by
    ``payload``, the length field rewritten to match (cut to fit a 2-byte length)."""
    spans = element_spans(data)
    if not spans:
        return data
    span = spans[which % len(spans)]
    if span.length_size == 2:
        payload = payload[:0xFFFF]
        length = struct.pack("<H", len(payload))
    else:
        length = struct.pack("<I", len(payload))
    head = data[: span.length_at] + length + data[span.length_at + span.length_size : span.value]
    return head + payload + data[span.end :]


def mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One random mutation of ``data``: bit flips, a truncation, a deleted element or a
    hostile value. Returns the mutant and what was done (tag numbers, no values)."""
    kind = int(rng.integers(0, 4))
    if kind == 0:
        count = int(rng.integers(1, 9))
        positions = [int(p) for p in rng.integers(0, max(1, len(data) * 8), size=count)]
        return flip_bits(data, positions), f"flip {count} bits"
    if kind == 1:
        keep = int(rng.integers(0, max(1, len(data))))
        return truncate(data, keep), f"truncate to {keep} bytes"
    spans = element_spans(data)
    which = int(rng.integers(0, max(1, len(spans))))
    tag = f"({spans[which].tag >> 16:04X},{spans[which].tag & 0xFFFF:04X})" if spans else "-"
    if kind == 2:
        return delete_element(data, which), f"delete element {tag}"
    payload = HOSTILE_VALUES[int(rng.integers(0, len(HOSTILE_VALUES)))]
    return replace_value(data, which, payload), f"replace the value of {tag}"


@dataclass
class StageRun:
    """What the in-process stages made of some files (:func:`run_stages`)."""

    #: The header stage's output (instance and failure rows).
    batch: Any
    #: Volume plans and their built catalog rows, in plan order (None where it failed).
    built: list[tuple[Any, dict[str, Any] | None]]
    #: Failure codes of every stage, in order.
    codes: list[str]


def run_stages(
    files: Sequence[str | os.PathLike[str]],
    store: str | os.PathLike[str],
    config: Any,
    *,
    build: bool = True,
    on_build: Callable[[float], None] | None = None,
) -> StageRun:
    """Run one ingest's stages in this process: headers, plan and (``build``) volumes.

    The fuzz tests and ``benchmarks/fuzz.py`` use it to reach every stage without a
    cluster. ``config`` is an :class:`~voxlake.config.IngestConfig`; anything a stage does
    not turn into a coded failure propagates. ``on_build`` gets each build's seconds.
    """
    import time

    from voxlake.catalog.tables import rows_to_table
    from voxlake.errors import VoxlakeError
    from voxlake.ingest.headers import read_headers
    from voxlake.ingest.readers.dicom import build_volume
    from voxlake.ingest.series import plan_volumes
    from voxlake.ingest.sources import FileRef

    refs = [FileRef(os.fspath(f), os.path.getsize(f), 0.0) for f in files]
    batch = read_headers(refs, secret=config.secret, config=config, run_id="fuzz")
    if len(batch.instances) + len(batch.failures) != len(refs):
        raise AssertionError("a file was neither an instance nor a failure")
    run = StageRun(batch, [], [row["code"] for row in batch.failures])
    if not build or not batch.instances:
        return run
    frame = rows_to_table("instances", batch.instances).to_pandas()
    plans, failures = plan_volumes(frame, max_voxels=config.max_voxels)
    run.codes += [f.error.code for f in failures]
    for plan in plans:
        start = time.monotonic()
        try:
            row = build_volume(
                plan,
                store_url=os.fspath(store),
                store_config=config.store,
                run_id="fuzz",
                max_file_bytes=config.max_file_bytes,
            )
        except VoxlakeError as exc:
            run.codes.append(exc.code)
            run.built.append((plan, None))
        else:
            run.built.append((plan, row))
        if on_build is not None:
            on_build(time.monotonic() - start)
    return run
