"""Native slices read from the span the header pass recorded equal what pydicom decodes.

The volume stage reads a native single-frame slice with one ranged read at the offset
the header pass found, instead of parsing the file again. These tests compare it with
pydicom's full read on real files of every transfer syntax in ``dcm_qa_ts``, on the
synthetic sample, on hand-made explicit and implicit VR files, and check that a file
changed after the header pass is never read from its old span.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from voxlake.config import IngestConfig, StoreConfig
from voxlake.errors import DecodeError
from voxlake.ingest.dicom_bytes import parse_dicom_bytes
from voxlake.ingest.headers import read_headers
from voxlake.ingest.readers.dicom import build_volume
from voxlake.ingest.readers.native import native_frame, read_span, syntax_of, with_pixel_spans
from voxlake.ingest.series import plan_volumes
from voxlake.ingest.sources import list_source
from voxlake.volumes.reader import read_volume

from ..conftest import SECRET, require_shared_data

if TYPE_CHECKING:
    from collections.abc import Iterator

CONFIG = IngestConfig(secret=SECRET)


def _header_pass(paths: list[Path]):
    refs = [ref for path in paths for ref in list_source(path)]
    return read_headers(refs, secret=SECRET, config=CONFIG, run_id="t")


def _spans_of(paths: list[Path]) -> dict[str, object]:
    return _header_pass(paths).pixel_spans


def _check_files(paths: list[Path]) -> tuple[int, set[str]]:
    """Every span reads what pydicom decodes; every file native_frame unpacks has a span."""
    batch = _header_pass(paths)
    spans, accepted = batch.pixel_spans, {row["url"] for row in batch.instances}
    checked, syntaxes = 0, set()
    for path in paths:
        data = path.read_bytes()
        try:
            ds, gzipped = parse_dicom_bytes(data, max_bytes=1 << 30)
        except Exception:
            continue  # READMEs, NIfTI references, hostile files: not this test's subject
        span = spans.get(str(path))
        native = native_frame(ds, syntax_of(ds)) if "PixelData" in ds else None
        if span is None:
            # Only gzipped files and files the header pass refused (bad rescale, no UID...)
            # may lack a span although native_frame unpacks them.
            assert native is None or gzipped or str(path) not in accepted, path.name
            continue
        assert not gzipped
        assert data[span.offset : span.offset + span.length] == ds.PixelData, path.name
        got = read_span(str(path), span)
        expected = ds.pixel_array
        assert got is not None and got.dtype == expected.dtype, path.name
        assert np.array_equal(got, expected), path.name
        assert got.flags.writeable
        checked += 1
        syntaxes.add(span.syntax)
    return checked, syntaxes


def test_spans_of_real_files_read_what_pydicom_decodes():
    root = require_shared_data("dcm_qa_ts")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() != ".md")
    checked, syntaxes = _check_files(paths)
    # Explicit and implicit little endian are among them; compressed and big-endian
    # files get no span (pydicom decodes those, as before).
    assert checked >= 2
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"} <= syntaxes


def test_spans_of_the_synthetic_sample_read_what_pydicom_decodes(tiny_sample):
    paths = sorted(p for p in Path(tiny_sample.root).rglob("*") if p.is_file())
    checked, _ = _check_files(paths)
    assert checked >= 20


def _write(path: Path, *, implicit: bool, allocated: int, stored: int, signed: int,
           shape: tuple[int, int], preamble: bool = True) -> Dataset:  # fmt: skip
    rng = np.random.default_rng(allocated * 31 + stored + implicit)
    raw = rng.integers(0, 256, size=shape[0] * shape[1] * allocated // 8, dtype=np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "SPAN-TEST", "CT"
    ds.Rows, ds.Columns = shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, stored - 1
    ds.PixelRepresentation, ds.SamplesPerPixel = signed, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.ImageComments = "x" * 7  # odd text before the pixels: offsets are not round
    ds.PixelData = raw.tobytes() + (b"\0" if raw.size % 2 else b"")
    ds["PixelData"].VR = "OB" if allocated == 8 else "OW"
    ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=preamble)
    return ds


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize(
    ("allocated", "stored", "signed", "shape"),
    [(16, 12, 1, (5, 7)), (16, 16, 0, (4, 4)), (8, 8, 0, (3, 3)), (32, 20, 1, (2, 3))],
)
def test_explicit_and_implicit_vr_spans(tmp_path, implicit, allocated, stored, signed, shape):
    path = tmp_path / "one.dcm"
    _write(path, implicit=implicit, allocated=allocated, stored=stored, signed=signed,
           shape=shape)  # fmt: skip
    checked, syntaxes = _check_files([path])
    assert checked == 1
    assert syntaxes == {str(ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)}


def test_gzipped_and_big_endian_files_get_no_span(tmp_path):
    import gzip

    plain = tmp_path / "plain.dcm"
    _write(plain, implicit=False, allocated=16, stored=12, signed=1, shape=(4, 4))
    (tmp_path / "zipped.dcm.gz").write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()
    assert _spans_of([tmp_path]) == {}
    try:
        big = require_shared_data("dcm_qa_ts")
    except pytest.skip.Exception:
        return
    for path in big.rglob("*"):
        if path.is_file() and path.suffix.lower() != ".md":
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            if str(ds.file_meta.get("TransferSyntaxUID", "")) == "1.2.840.10008.1.2.2":
                assert str(path) not in _spans_of([path])


def _series(tmp_path: Path, tiny_sample) -> tuple[Path, list]:
    """A copy of the sample's first plannable all-native series, and its plan."""
    source = Path(tiny_sample.root) / "dicom"
    for folder in sorted(p for p in source.rglob("*") if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.is_file())
        if len(files) < 3:
            continue
        copy = tmp_path / "series"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(folder, copy)
        refs = list_source(copy)
        batch = read_headers(refs, secret=SECRET, config=CONFIG, run_id="t")
        plans, failures = plan_volumes(pd.DataFrame(batch.instances))
        if len(plans) != 1 or failures or batch.failures:
            continue
        plan = with_pixel_spans(plans[0], batch.pixel_spans)
        if len(plan.slices) >= 3 and all(s.pixels is not None for s in plan.slices):
            return copy, [plans[0], plan]
    pytest.fail("no all-native series in the sample")


def _build(plan, store: Path) -> np.ndarray:
    row = build_volume(plan, store_url=str(store), store_config=StoreConfig(), run_id="t",
                       max_file_bytes=1 << 30)  # fmt: skip
    volume, attrs = read_volume(str(store), row["store_path"])
    return volume, attrs


def test_volume_from_spans_equals_the_pydicom_path(tmp_path, tiny_sample):
    _, (plain, spanned) = _series(tmp_path, tiny_sample)
    assert all(s.pixels is None for s in plain.slices)
    expected, attrs_plain = _build(plain, tmp_path / "a.zarr")
    got, attrs_span = _build(spanned, tmp_path / "b.zarr")
    assert got.dtype == expected.dtype and np.array_equal(got, expected)
    assert attrs_span["decoder"] == attrs_plain["decoder"]


def test_a_file_changed_after_the_header_pass_is_not_read_from_its_span(tmp_path, tiny_sample):
    _, (plain, spanned) = _series(tmp_path, tiny_sample)
    expected, _ = _build(plain, tmp_path / "ref.zarr")
    ref = spanned.slices[1]
    path = Path(ref.url)
    original = path.read_bytes()
    stat = path.stat()
    span = ref.pixels
    changed = bytearray(original)
    changed[span.offset : span.offset + 8] = bytes(
        255 - b for b in changed[span.offset : span.offset + 8]
    )
    path.write_bytes(bytes(changed))  # same size, other pixels, a new mtime
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(DecodeError) as info:
        _build(spanned, tmp_path / "changed.zarr")
    assert info.value.code == "source_changed"
    # Touched but not changed: the whole file is read, its hash matches, the volume builds.
    path.write_bytes(original)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000))
    got, _ = _build(spanned, tmp_path / "touched.zarr")
    assert np.array_equal(got, expected)
    # A span whose size no longer matches is not used either (file grown in place).
    grown = dataclasses.replace(span, size=span.size + 2)
    slices = list(spanned.slices)
    slices[1] = dataclasses.replace(ref, pixels=grown)
    got, _ = _build(dataclasses.replace(spanned, slices=tuple(slices)), tmp_path / "grown.zarr")
    assert np.array_equal(got, expected)


@contextlib.contextmanager
def _counting_span_reads(monkeypatch) -> Iterator[tuple[Any, list[str]]]:
    """A client of in-process workers (so the patched reader is the one the tasks call)
    and the paths ``read_span`` is called with, in call order."""
    from distributed import Client, LocalCluster

    from voxlake.ingest.readers import dicom

    calls: list[str] = []

    def counted(path, span):
        calls.append(path)
        return read_span(path, span)

    monkeypatch.setattr(dicom, "read_span", counted)
    with (
        LocalCluster(
            n_workers=1, processes=False, threads_per_worker=1, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client, calls


def _stored_volume(catalog: Path, store: Path) -> np.ndarray:
    """The voxels of the catalog's one volume."""
    from voxlake.catalog import open_catalog

    row = open_catalog(str(catalog)).read("volumes").iloc[0]
    return read_volume(str(store), row["store_path"])[0]


def test_ingest_reads_native_slices_from_their_spans(tmp_path, tiny_sample, monkeypatch):
    """Through the driver: the spans of this run's header pass reach the volume tasks."""
    from voxlake.ingest import ingest

    folder, (plain, _) = _series(tmp_path, tiny_sample)
    expected, _ = _build(plain, tmp_path / "ref.zarr")
    catalog, store = tmp_path / "catalog", tmp_path / "volumes.zarr"
    with _counting_span_reads(monkeypatch) as (client, calls):
        report = ingest([folder], catalog=catalog, store=store, config=CONFIG, client=client)
    assert report.volumes_written == 1 and report.failures == 0
    assert sorted(calls) == sorted(s.url for s in plain.slices)
    assert np.array_equal(_stored_volume(catalog, store), expected)


def test_instance_rows_keep_their_spans_exactly(tmp_path, tiny_sample):
    """What a header row keeps in its pixel_* columns gives back the span the header pass
    found, through the catalog's own types; files without a span keep nulls."""
    import gzip

    from voxlake.catalog.tables import rows_to_table
    from voxlake.ingest.readers.native import SPAN_COLUMNS, stored_spans

    first = sorted(p for p in (Path(tiny_sample.root) / "dicom").rglob("*") if p.is_file())[0]
    zipped = tmp_path / "gz" / "slice.dcm.gz"
    zipped.parent.mkdir()
    zipped.write_bytes(gzip.compress(first.read_bytes()))
    batch = _header_pass([Path(tiny_sample.root) / "dicom", zipped.parent])
    assert batch.pixel_spans and str(zipped) not in batch.pixel_spans
    assert str(zipped) in {row["url"] for row in batch.instances}
    frame = rows_to_table("instances", batch.instances).to_pandas()
    kept = stored_spans(frame)
    assert kept == batch.pixel_spans
    known = set(sorted(kept)[:3])
    assert stored_spans(frame, skip=known) == {u: s for u, s in kept.items() if u not in known}
    for row in batch.instances:
        if row["url"] not in batch.pixel_spans:
            assert all(row.get(name) is None for name in SPAN_COLUMNS), row["url"]


def test_a_span_the_row_cannot_give_back_is_not_kept():
    """A file without a TransferSyntaxUID (its syntax came from the encoding), or a row
    whose size, mtime, hash or matrix differ from the span's, keeps no span."""
    from voxlake.ingest.readers.native import PixelSpan, span_columns

    span = PixelSpan(
        offset=1200, length=512, dtype="<i2", rows=16, columns=16, shift=4,
        syntax="1.2.840.10008.1.2.1", size=1712, mtime=5.5, content_hash="b3:x",
    )  # fmt: skip
    row = {"rows": 16, "columns": 16, "transfer_syntax_uid": "1.2.840.10008.1.2.1",
           "size": 1712, "mtime": 5.5, "content_hash": "b3:x"}  # fmt: skip
    assert span_columns(span, row) == {
        "pixel_offset": 1200, "pixel_length": 512, "pixel_dtype": "<i2", "pixel_shift": 4,
    }  # fmt: skip
    for name, other in (("transfer_syntax_uid", None), ("size", 1713), ("mtime", 5.6),
                        ("content_hash", "b3:y"), ("rows", 17), ("columns", 15)):  # fmt: skip
        assert span_columns(span, {**row, name: other}) == {}, name


def test_a_headers_only_survey_keeps_the_spans_a_later_build_reads(
    tmp_path, tiny_sample, monkeypatch
):
    """A --headers-only run reads no pixels; the run that builds the volumes later reads
    every native slice at the offset the survey kept in the catalog, not by parsing."""
    from voxlake.ingest import ingest

    folder, (plain, _) = _series(tmp_path, tiny_sample)
    expected, _ = _build(plain, tmp_path / "ref.zarr")
    catalog, store = tmp_path / "catalog", tmp_path / "volumes.zarr"
    survey = dataclasses.replace(CONFIG, headers_only=True)
    with _counting_span_reads(monkeypatch) as (client, calls):
        ingest([folder], catalog=catalog, config=survey, client=client)
        assert calls == []
        report = ingest([folder], catalog=catalog, store=store, config=CONFIG, client=client)
    assert report.files_skipped == report.files_seen and report.volumes_written == 1
    assert sorted(calls) == sorted(s.url for s in plain.slices)
    assert np.array_equal(_stored_volume(catalog, store), expected)
