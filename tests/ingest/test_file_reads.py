"""The header pass reads the next files while it parses one: in order, bounded, and a
failed read fails its own file only."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from voxlake.config import IngestConfig
from voxlake.ingest import file_reads
from voxlake.ingest.file_reads import READ_AHEAD_FILES
from voxlake.ingest.headers import read_headers
from voxlake.ingest.sources import FileRef, list_source

from ..conftest import SECRET


class _Watch:
    """Wraps ``open_bytes``: counts reads in flight and keeps the most seen at once."""

    def __init__(self, real, delay: float = 0.0) -> None:
        self.real, self.delay = real, delay
        self.lock = threading.Lock()
        self.now = self.most = 0
        self.started: list[str] = []
        self.threads: list[str] = []

    def __call__(self, url: str, **kwargs):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.started.append(url)
            self.threads.append(threading.current_thread().name)
        try:
            time.sleep(self.delay)
            return self.real(url, **kwargs)
        finally:
            with self.lock:
                self.now -= 1


def _files(root: Path, n: int, size: int = 1000) -> list[FileRef]:
    root.mkdir(parents=True, exist_ok=True)
    refs = []
    for i in range(n):
        path = root / f"f{i:03d}.bin"
        path.write_bytes(bytes([i % 251]) * size)
        refs.append(FileRef(url=str(path), size=size, mtime=path.stat().st_mtime))
    return refs


def test_files_come_in_order_with_their_own_bytes(tmp_path: Path) -> None:
    refs = _files(tmp_path, 23)
    got = [
        (ref.url, future.result()) for ref, future in file_reads.read_ahead(refs, IngestConfig())
    ]
    assert [url for url, _ in got] == [ref.url for ref in refs]
    assert all(data == Path(url).read_bytes() for url, data in got)


class _Advice:
    """Wraps ``os.posix_fadvise``: the files the kernel was asked to read, in order."""

    def __init__(self, real) -> None:
        self.real = real
        self.paths: list[str] = []

    def __call__(self, fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_WILLNEED and (offset, length) == (0, 0)
        self.paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        self.real(fd, offset, length, advice)


needs_fadvise = pytest.mark.skipif(
    not hasattr(os, "posix_fadvise") or not Path("/proc/self/fd").is_dir(),
    reason="POSIX_FADV_WILLNEED and /proc (Linux)",
)


@needs_fadvise
@pytest.mark.parametrize("read_ahead", [None, 0, 1, 5])
def test_local_files_are_read_ahead_by_the_kernel_within_the_bound(
    tmp_path: Path, monkeypatch, read_ahead: int | None
) -> None:
    """Local files: the next `depth` files are handed to the kernel to read
    (POSIX_FADV_WILLNEED), and each is read in the caller's thread, no read thread."""
    refs = _files(tmp_path, 30)
    advice = _Advice(os.posix_fadvise)
    monkeypatch.setattr(os, "posix_fadvise", advice)
    depth = READ_AHEAD_FILES["local"] if read_ahead is None else read_ahead
    lead = 0
    done = []
    for i, (ref, future) in enumerate(
        file_reads.read_ahead(refs, IngestConfig(read_ahead=read_ahead))
    ):
        assert future.done()  # read already, here
        done.append((ref.url, future.result()))
        assert not [t for t in threading.enumerate() if t.name.startswith("voxlake-read-ahead")]
        assert len(advice.paths) <= i + 1 + depth
        lead = max(lead, len(advice.paths) - (i + 1))
    assert done == [(ref.url, Path(ref.url).read_bytes()) for ref in refs]
    assert advice.paths == [str(Path(ref.url).resolve()) for ref in refs]
    assert lead == depth


@needs_fadvise
def test_local_files_opened_ahead_are_closed_when_the_caller_stops(tmp_path: Path) -> None:
    refs = _files(tmp_path, 30)
    before = len(os.listdir("/proc/self/fd"))
    reads = file_reads.read_ahead(refs, IngestConfig(read_ahead=5))
    for _ in range(3):
        next(reads)
    assert len(os.listdir("/proc/self/fd")) > before  # the next ones are open
    reads.close()
    assert len(os.listdir("/proc/self/fd")) == before


@needs_fadvise
def test_local_reads_fail_in_their_own_turn(tmp_path: Path) -> None:
    from voxlake.errors import SourceError

    refs = _files(tmp_path, 6)
    refs[4] = FileRef(url=str(tmp_path / "big.bin"), size=5000, mtime=0.0)
    Path(refs[4].url).write_bytes(bytes(5000))
    refs.insert(2, FileRef(url=str(tmp_path / "vanished.bin"), size=10, mtime=0.0))

    def outcome(read) -> object:
        try:
            return len(read())
        except SourceError as exc:
            return (exc.code, exc.message)

    advised = [
        outcome(future.result)
        for _, future in file_reads.read_ahead(refs, IngestConfig(max_file_bytes=4000))
    ]
    one_by_one = [
        outcome(lambda ref=ref: file_reads.open_bytes(ref.url, max_bytes=4000)) for ref in refs
    ]
    assert advised == one_by_one  # the same errors as a plain read, each in its turn
    assert [a if isinstance(a, int) else a[0] for a in advised] == [
        1000, 1000, "unreadable", 1000, 1000, "file_too_large", 1000,
    ]  # fmt: skip


@pytest.mark.parametrize("read_ahead", [None, 0, 1, 5])
def test_reads_ahead_in_threads_but_never_more_than_the_bound(
    tmp_path: Path, monkeypatch, read_ahead: int | None
) -> None:
    """Where the kernel cannot be asked (no posix_fadvise), threads read local files."""
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    refs = _files(tmp_path, 30)
    watch = _Watch(file_reads.open_bytes, delay=0.01)
    monkeypatch.setattr(file_reads, "open_bytes", watch)
    depth = READ_AHEAD_FILES["local"] if read_ahead is None else read_ahead
    config = IngestConfig(read_ahead=read_ahead)
    lead = 0
    done = []
    for i, (ref, future) in enumerate(file_reads.read_ahead(refs, config)):
        done.append((ref.url, future.result()))
        time.sleep(0.02)  # "parsing": the reads ahead run meanwhile
        # Started so far: this file, and at most `depth` files after it.
        assert len(watch.started) <= i + 1 + depth
        lead = max(lead, len(watch.started) - (i + 1))
    assert done == [(ref.url, Path(ref.url).read_bytes()) for ref in refs]  # every file
    assert lead == depth  # it did read ahead, as far as allowed
    assert watch.most <= max(1, depth)  # in at most `depth` threads
    assert (watch.most > 1) == (depth > 1)  # concurrently, when more than one thread


def test_read_ahead_is_validated_and_read_from_the_environment(monkeypatch) -> None:
    from voxlake.config import load_config
    from voxlake.errors import ConfigError

    with pytest.raises(ConfigError, match="read_ahead"):
        IngestConfig(read_ahead=-1)
    monkeypatch.setenv("VOXLAKE_READ_AHEAD", "3")
    assert load_config(None).read_ahead == 3


@pytest.mark.parametrize("advised", [True, False])
def test_bytes_in_flight_are_capped(tmp_path: Path, monkeypatch, advised: bool) -> None:
    monkeypatch.setattr(file_reads, "READ_AHEAD_BYTES", 2500)
    refs = _files(tmp_path, 12, size=1000)
    if advised and hasattr(os, "posix_fadvise"):
        advice = _Advice(os.posix_fadvise)
        monkeypatch.setattr(os, "posix_fadvise", advice)
        for i, (_, future) in enumerate(file_reads.read_ahead(refs, IngestConfig())):
            future.result()
            assert len(advice.paths) <= i + 1 + 3  # as below
        return
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    watch = _Watch(file_reads.open_bytes, delay=0.01)
    monkeypatch.setattr(file_reads, "open_bytes", watch)
    for i, (_, future) in enumerate(file_reads.read_ahead(refs, IngestConfig())):
        future.result()
        time.sleep(0.02)
        # 2,500 listed bytes: this file and at most 3 more (the cap is checked before each)
        assert len(watch.started) <= i + 1 + 3


def test_a_failed_read_fails_its_own_file_only(tmp_path: Path, tiny_sample) -> None:
    refs = list(list_source(tiny_sample.root / "dicom"))[:12]
    gone = FileRef(url=str(tmp_path / "vanished.dcm"), size=1000, mtime=0.0)
    refs.insert(5, gone)
    batch = read_headers(refs, secret=SECRET, config=IngestConfig(secret=SECRET), run_id="r")
    assert [f["subject"] for f in batch.failures] == [gone.url]
    assert [row["url"] for row in batch.instances] == [r.url for r in refs if r is not gone]


def test_on_error_raise_stops_at_the_failed_file(tmp_path: Path, tiny_sample) -> None:
    refs = list(list_source(tiny_sample.root / "dicom"))[:6]
    refs.insert(2, FileRef(url=str(tmp_path / "vanished.dcm"), size=1000, mtime=0.0))
    config = IngestConfig(secret=SECRET, on_error="raise")
    with pytest.raises(Exception, match="cannot read file"):
        read_headers(refs, secret=SECRET, config=config, run_id="r")


def test_a_generator_of_files_reads_like_a_list(tiny_sample) -> None:
    config = IngestConfig(secret=SECRET)
    listed = list(list_source(tiny_sample.root / "dicom"))[:9]
    from_list = read_headers(listed, secret=SECRET, config=config, run_id="r")
    from_generator = read_headers(iter(listed), secret=SECRET, config=config, run_id="r")
    assert len(from_list.instances) == 9
    urls = [[row["url"] for row in b.instances] for b in (from_list, from_generator)]
    assert urls[0] == urls[1]


@pytest.mark.parametrize("suffix", ["zip", "tar.gz"])
def test_archive_members_are_read_one_at_a_time(tmp_path: Path, tiny_sample, monkeypatch, suffix):
    """Members share one open archive whose reads seek a shared file object: they are
    never read concurrently, and every member's bytes are its own."""
    import tarfile
    import zipfile

    files = sorted(p for p in (tiny_sample.root / "dicom").rglob("*") if p.is_file())[:10]
    archive = tmp_path / f"a.{suffix}"
    if suffix == "zip":
        with zipfile.ZipFile(archive, "w") as z:
            for i, path in enumerate(files):
                z.write(path, f"m{i:02d}.dcm")
    else:
        with tarfile.open(archive, "w:gz") as t:
            for i, path in enumerate(files):
                t.add(path, f"m{i:02d}.dcm")
    refs = list(list_source(archive))
    assert len(refs) == len(files) and all("::" in ref.url for ref in refs)
    watch = _Watch(file_reads.open_bytes, delay=0.005)
    monkeypatch.setattr(file_reads, "open_bytes", watch)
    # A deeper read-ahead queues more members, still for one reading thread.
    got = [future.result() for _, future in file_reads.read_ahead(refs, IngestConfig(read_ahead=4))]
    assert watch.most == 1
    by_name = {f"m{i:02d}.dcm": path.read_bytes() for i, path in enumerate(files)}
    assert got == [by_name[ref.url.split("::")[0].rsplit("/", 1)[-1]] for ref in refs]


@pytest.mark.parametrize("read_ahead", [None, 2])
def test_a_pacs_gets_at_most_read_ahead_requests_per_task(monkeypatch, read_ahead) -> None:
    """Remote sources (object storage, DICOMweb) read 8 ahead by default, or as configured."""
    refs = [
        FileRef(url=f"dicomweb+http://127.0.0.1:9/dicom-web/studies/1/series/2/instances/{i}",
                size=1000, mtime=0.0)
        for i in range(20)
    ]  # fmt: skip
    watch = _Watch(lambda url, **kwargs: url.encode(), delay=0.01)  # no server: the bytes
    monkeypatch.setattr(file_reads, "open_bytes", watch)
    depth = READ_AHEAD_FILES["remote"] if read_ahead is None else read_ahead
    got = []
    for _, future in file_reads.read_ahead(refs, IngestConfig(read_ahead=read_ahead)):
        got.append(future.result())
        time.sleep(0.02)
    assert got == [ref.url.encode() for ref in refs]
    assert 1 < watch.most <= depth


@pytest.mark.parametrize("read_ahead", [0, 1, None])
def test_every_file_gets_its_row_whatever_the_read_ahead(tiny_sample, read_ahead) -> None:
    refs = list(list_source(tiny_sample.root / "dicom"))[:20]
    config = IngestConfig(secret=SECRET, read_ahead=read_ahead)
    batch = read_headers(refs, secret=SECRET, config=config, run_id="r")
    assert [row["url"] for row in batch.instances] == [ref.url for ref in refs]


@needs_fadvise
def test_a_deep_read_ahead_keeps_few_files_open(tmp_path: Path) -> None:
    refs = _files(tmp_path, 200, size=10)
    before = len(os.listdir("/proc/self/fd"))
    most = 0
    for _, future in file_reads.read_ahead(refs, IngestConfig(read_ahead=10_000)):
        future.result()
        most = max(most, len(os.listdir("/proc/self/fd")) - before)
    assert 0 < most <= file_reads._OPEN_AHEAD + 1


@pytest.mark.s3
@pytest.mark.integration
@pytest.mark.parametrize("order", ["planned", "slab by slab"])
def test_volume_tasks_read_remote_slices_ahead_within_the_bound(
    tiny_sample, s3_bucket, monkeypatch, order
) -> None:
    """A volume task reads slices on object storage a few files ahead of the one it
    decodes, in threads, and never holds more than twice that many unasked files: also
    when the frames are asked for out of the planned order, as a 4D series does."""
    import numpy as np
    import pydicom
    import s3fs

    from voxlake.ingest.readers import dicom
    from voxlake.ingest.series import SliceRef

    bucket, options = s3_bucket
    series = max(tiny_sample.series, key=lambda s: len(s.files))
    fs = s3fs.S3FileSystem(**options)
    urls = []
    for path in series.files:
        fs.put(str(path), f"{bucket}/slices/{path.name}")
        urls.append(f"s3://{bucket}/slices/{path.name}")
    assert len(urls) >= 8
    watch = _Watch(dicom.open_bytes, delay=0.01)
    monkeypatch.setattr(dicom, "open_bytes", watch)
    depth = 3
    asked = list(range(len(urls)))
    if order == "slab by slab":  # two "time points", two slices each at a time
        half = len(urls) // 2
        asked = [t * half + z0 + dz for z0 in range(0, half, 2) for t in (0, 1) for dz in (0, 1)
                 if z0 + dz < half]  # fmt: skip
        asked += range(2 * half, len(urls))
    assert sorted(asked) == list(range(len(urls)))
    with dicom.FrameDecoder(max_file_bytes=1 << 24, storage_options=options) as decoder:
        decoder.read_ahead(urls, depth)
        for n, i in enumerate(asked, start=1):
            ref = SliceRef(urls[i], 0, 1.0, 0.0, "", "")
            ds = pydicom.dcmread(series.files[i])
            pixels = decoder.frame(ref, rows=ds.Rows, columns=ds.Columns)
            assert np.array_equal(pixels, ds.pixel_array)
            assert len(watch.started) - n <= 2 * depth  # started but not asked for yet
            time.sleep(0.02)  # "decoding": the reads ahead run meanwhile
        threads = set(watch.threads)
    assert sorted(watch.started) == sorted(urls)  # each file read once
    assert any(name.startswith("voxlake-volume-read") for name in threads)
    assert watch.most <= depth + 1  # the threads and the decoding thread
