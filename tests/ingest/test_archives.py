"""Archive members are read through one open archive per process: the bytes are those
Python's zipfile and tarfile extract, and the archive is read about once, not once per
member (bounded by the bytes the process reads, /proc/self/io)."""

from __future__ import annotations

import gzip
import io
import os
import random
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxlake.errors import SourceError
from voxlake.ingest import archives
from voxlake.ingest.archives import SeekableGzip
from voxlake.ingest.file_reads import open_bytes
from voxlake.ingest.sources import list_source
from voxlake.testing.hostile import cut_tar_members

FORMATS = ["zip", "tar", "tar.gz", "tar.bz2", "tar.xz"]


@pytest.fixture(autouse=True)
def _closed_archives():
    archives._CACHE.clear()
    yield
    archives._CACHE.clear()


def _members(count: int, seed: int = 0, *, largest: int = 300_000) -> dict[str, bytes]:
    """Compressible members of many sizes (some span several of the gzip reader's pieces
    when the pieces are small), in two folders."""
    rng = random.Random(seed)
    out = {}
    for i in range(count):
        size = rng.choice([0, 1, 511, 512, 513, rng.randrange(1, largest)])
        words = rng.choices([b"CT ", b"slice ", b"\x00\x01", b"HU "], k=size // 3 + 1)
        out[f"S{i % 2}/IM{i:04d}.dcm"] = b"".join(words)[:size]
    return out


def _write(path: Path, kind: str, members: dict[str, bytes]) -> Path:
    if kind == "zip":
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, data in members.items():
                archive.writestr(name, data)
        return path
    mode = {"tar": "w", "tar.gz": "w:gz", "tar.bz2": "w:bz2", "tar.xz": "w:xz"}[kind]
    with tarfile.open(path, mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _extracted(path: Path) -> dict[str, bytes]:
    """The independent reference: what zipfile or tarfile extract."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return {name: archive.read(name) for name in archive.namelist()}
    with tarfile.open(path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}


def _member(url: str) -> str:
    return url.split("://", 1)[1].split("::", 1)[0]


def _bytes_read() -> int:
    """Bytes this process has read through read(2) and its kin (page cache included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


needs_proc_io = pytest.mark.skipif(
    not os.path.exists("/proc/self/io"), reason="counts bytes read through /proc/self/io"
)


@pytest.mark.parametrize("kind", FORMATS)
def test_members_read_in_any_order_are_the_extracted_bytes(tmp_path, kind):
    path = _write(tmp_path / f"a.{kind}", kind, _members(60))
    expected = _extracted(path)
    refs = [ref for ref in list_source(path)]
    assert sorted(_member(ref.url) for ref in refs) == sorted(expected)
    order = refs + random.Random(1).sample(refs, len(refs)) + refs[::-1]  # forward, back
    for ref in order:
        assert open_bytes(ref.url, max_bytes=1 << 20) == expected[_member(ref.url)], ref.url


def test_tar_members_are_listed_in_archive_order(tmp_path):
    members = dict(sorted(_members(20).items(), reverse=True))  # archived Z to A
    path = _write(tmp_path / "a.tar.gz", "tar.gz", members)
    assert [_member(ref.url) for ref in list_source(path)] == list(members)


@needs_proc_io
@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_an_archive_is_read_about_once_not_once_per_member(tmp_path, kind):
    """2,000 small members: reading each through an archive opened (and indexed) for it
    would read the zip's central directory or the tar's headers 2,000 times."""
    members = {f"S0/IM{i:05d}.dcm": bytes([i % 251]) * 1024 for i in range(2000)}
    path = _write(tmp_path / f"a.{kind}", kind, members)
    refs = list(list_source(path))
    before = _bytes_read()
    for ref in refs:
        assert open_bytes(ref.url, max_bytes=1 << 20) == members[_member(ref.url)]
    read = _bytes_read() - before
    size = path.stat().st_size
    assert read < 2 * size + (1 << 20), (read, size)


@needs_proc_io
def test_a_compressed_tar_read_out_of_order_is_decompressed_about_once(tmp_path):
    """Members read in random order, as a series' slices are read by position: the
    decompressed pieces kept (up to 64 MiB) serve the reads behind the decompressor."""
    path = _write(tmp_path / "a.tar.gz", "tar.gz", _members(200, largest=200_000))
    expected = _extracted(path)
    refs = random.Random(2).sample(list(list_source(path)), 200)
    before = _bytes_read()
    for ref in refs:
        assert open_bytes(ref.url, max_bytes=1 << 20) == expected[_member(ref.url)]
    read = _bytes_read() - before
    assert read < 2 * path.stat().st_size + (1 << 20), (read, path.stat().st_size)


def test_a_replaced_archive_is_opened_again(tmp_path):
    path = _write(tmp_path / "a.tar.gz", "tar.gz", {"IM1": b"first"})
    assert open_bytes(f"tar://IM1::{path}", max_bytes=1024) == b"first"
    _write(tmp_path / "b.tar.gz", "tar.gz", {"IM1": b"second, longer"}).replace(path)
    assert open_bytes(f"tar://IM1::{path}", max_bytes=1024) == b"second, longer"


def test_caps_missing_members_and_cut_archives_are_coded_errors(tmp_path):
    members = {"S0/IM1": b"x" * 5000, "S0/IM2": os.urandom(400_000)}
    path = _write(tmp_path / "a.tar.gz", "tar.gz", members)
    with pytest.raises(SourceError) as info:
        open_bytes(f"tar://S0/IM1::{path}", max_bytes=4096)
    assert info.value.code == "file_too_large"
    with pytest.raises(SourceError) as info:
        open_bytes(f"tar://S0/IM9::{path}", max_bytes=1 << 20)
    assert info.value.code == "unreadable"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut in half
    with pytest.raises(SourceError) as info:
        open_bytes(f"tar://S0/IM2::{path}", max_bytes=1 << 20)
    assert info.value.code == "corrupt_archive"


# --------------------------------------------------------------------------- SeekableGzip
@st.composite
def _streams(draw):
    """Gzip streams of 1 to 3 members with zero padding after some, and their bytes."""
    parts = draw(st.lists(st.binary(min_size=0, max_size=40_000), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**16))
    rng = random.Random(seed)
    compressed = plain = b""
    for part in parts:
        data = (part * rng.randint(1, 8))[: rng.randint(0, 120_000)]  # compressible
        compressed += gzip.compress(data, compresslevel=rng.choice([1, 6, 9]))
        compressed += b"\0" * rng.choice([0, 0, 7, 512])
        plain += data
    return compressed, plain


@settings(max_examples=60, deadline=None)
@given(
    stream=_streams(),
    ops=st.lists(st.tuples(st.integers(0, 400_000), st.integers(0, 70_000)), max_size=25),
)
def test_seekable_gzip_reads_like_the_decompressed_bytes(stream, ops):
    """Any seek and read, with tiny pieces, spacing and cache so that every path is taken:
    restoring a remembered state, thinning them, the cache, member boundaries."""
    compressed, plain = stream
    raw = SeekableGzip(
        io.BytesIO(compressed), spacing=4096, max_points=4, cache_bytes=3000, piece_bytes=1000
    )
    reader = io.BufferedReader(raw, buffer_size=700)  # as tarfile gets it: whole reads
    for offset, size in ops:
        offset = offset % (len(plain) + 10)
        assert reader.seek(offset) == offset
        expected = plain[offset : offset + size]
        assert reader.read(size) == expected
        assert reader.tell() == offset + len(expected)
    reader.seek(0)
    assert reader.read() == plain


def test_seekable_gzip_remembers_a_bounded_number_of_states():
    data = os.urandom(1 << 16) * 64  # 4 MiB that zlib compresses
    reader = SeekableGzip(io.BytesIO(gzip.compress(data)), spacing=1024, max_points=8)
    assert reader.read() == data
    assert len(reader._points) <= 8
    reader.seek(3 << 20)
    assert reader.read(10) == data[3 << 20 : (3 << 20) + 10]


def test_seekable_gzip_refuses_what_is_not_gzip():
    with pytest.raises(zlib.error):
        SeekableGzip(io.BytesIO(gzip.compress(b"x") + b"not gzip")).read()
    with pytest.raises(EOFError):
        SeekableGzip(io.BytesIO(gzip.compress(os.urandom(5000))[:-100])).read()


@pytest.mark.s3
@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archives_on_s3_are_read_member_by_member(tmp_path, s3_bucket, kind):
    import s3fs

    bucket, options = s3_bucket
    path = _write(tmp_path / f"a.{kind}", kind, _members(40))
    expected = _extracted(path)
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(path), f"{bucket}/exports/a.{kind}")
    refs = list(list_source(f"s3://{bucket}/exports", storage_options=options))
    assert sorted(_member(ref.url) for ref in refs) == sorted(expected)
    assert all(ref.url.endswith(f"::s3://{bucket}/exports/a.{kind}") for ref in refs)
    for ref in random.Random(3).sample(refs, len(refs)):
        data = open_bytes(ref.url, max_bytes=1 << 20, storage_options=options)
        assert data == expected[_member(ref.url)]


@pytest.mark.s3
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_a_remote_archive_replaced_is_opened_again(tmp_path, s3_bucket, kind, monkeypatch):
    """A worker outlives a run on a long-lived cluster: an archive replaced on the object
    store (another layout, so the kept index points elsewhere) must not be read through
    the index of the one it replaced."""
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    url = f"{kind}://IM2::s3://{bucket}/x/a.{kind}"
    first = {"IM1": b"one " * 1000, "IM2": b"two " * 1000}
    fs.put(str(_write(tmp_path / f"1.{kind}", kind, first)), f"{bucket}/x/a.{kind}")
    assert open_bytes(url, max_bytes=1 << 20, storage_options=options) == first["IM2"]
    second = {"IM0": b"zero " * 3000, "IM2": b"TWO, moved " * 500, "IM1": b"1"}
    fs.put(str(_write(tmp_path / f"2.{kind}", kind, second)), f"{bucket}/x/a.{kind}")
    monkeypatch.setattr(archives, "REVALIDATE_SECONDS", 0.0)  # the check is due
    assert open_bytes(url, max_bytes=1 << 20, storage_options=options) == second["IM2"]


@needs_proc_io
def test_a_cut_tar_gz_fails_each_member_after_the_cut_without_a_pass_per_member(tmp_path):
    members = {f"S0/IM{i:03d}": os.urandom(100_000) for i in range(60)}
    path = _write(tmp_path / "a.tar.gz", "tar.gz", members)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    codes, before = [], _bytes_read()
    for name, data in members.items():
        try:
            assert open_bytes(f"tar://{name}::{path}", max_bytes=1 << 20) == data
            codes.append("ok")
        except SourceError as exc:
            codes.append(exc.code)
    read = _bytes_read() - before
    assert codes[0] == "ok" and codes[-1] == "corrupt_archive", codes
    assert set(codes) == {"ok", "corrupt_archive"}
    assert codes.index("corrupt_archive") > 20  # the members before the cut are read
    assert read < 3 * path.stat().st_size, read  # not the readable part again per member


# --------------------------------------------------------------------------- listing
ODD_NAMES = ("./a/b.dcm", "a//c.dcm", "d/", "e.dcm", "e.dcm", "x/../../y.dcm", "/abs/z")


def _odd_tar(path: Path, kind: str) -> Path:
    """Names as archivers write them: './', doubled slashes, folders, a name archived
    twice, a link, an absolute path, a climb out. Each member's bytes name its position."""
    mode = {"tar": "w", "tar.gz": "w:gz", "tar.bz2": "w:bz2", "tar.xz": "w:xz"}[kind]
    with tarfile.open(path, mode) as archive:
        for index, name in enumerate(ODD_NAMES):
            info = tarfile.TarInfo(name)
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
                continue
            data = f"{index}:{name};".encode() * 100
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.dcm")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    return path


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "tar.bz2", "tar.xz"])
def test_tar_listing_names_what_fsspec_names_and_refuses_what_escapes(tmp_path, kind):
    import fsspec

    path = _odd_tar(tmp_path / f"a.{kind}", kind)
    items = list(list_source(path))
    refs = [i for i in items if not hasattr(i, "code")]
    refused = sorted(_member(i.url) for i in items if hasattr(i, "code"))
    # fsspec's own tar file system (the reference for member names) lists these files;
    # it drops the absolute name silently, where the listing refuses it.
    fs = fsspec.filesystem("tar", fo=f"file://{path}", skip_instance_cache=True)
    listed = {n for n, i in fs.find("", detail=True).items() if i["type"] == "file"}
    assert {_member(r.url) for r in refs} | (set(refused) - {"/abs/z"}) == listed
    assert refused == ["/abs/z", "link.dcm", "x/../../y.dcm"]
    assert [_member(r.url) for r in refs] == ["./a/b.dcm", "a/c.dcm", "e.dcm"]  # archive order
    assert {i.code for i in items if hasattr(i, "code")} == {"unsafe_member_path"}
    # Each listed member reads as its first copy in the archive.
    for ref, index in zip(refs, (0, 1, 3), strict=True):
        expected = f"{index}:{ODD_NAMES[index]};".encode() * 100
        assert open_bytes(ref.url, max_bytes=1 << 20) == expected


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "tar.bz2", "tar.xz"])
@pytest.mark.parametrize("fraction", [0.13, 0.5, 0.77, 0.95])
def test_a_cut_tar_lists_the_members_before_the_cut_then_fails(tmp_path, kind, fraction):
    members = {f"S0/IM{i:03d}": os.urandom(50_000) for i in range(40)}
    path = _write(tmp_path / f"a.{kind}", kind, members)
    whole = path.read_bytes()
    path.write_bytes(whole[: int(len(whole) * fraction)])
    listed, cut = cut_tar_members(whole, path.read_bytes())
    # bzip2 makes nothing of a block cut short (900 kB of input): 13% leaves no member
    assert listed or (kind, fraction) == ("tar.bz2", 0.13), "the cut leaves members"
    items = list(list_source(path))
    *refs, problem = items
    assert [_member(r.url) for r in refs] == listed
    assert (problem.url, problem.code) == (str(path), "corrupt_archive")
    assert (f"after {len(refs)} members" in problem.message) == bool(refs)
    for ref in refs:
        if _member(ref.url) == cut:
            with pytest.raises(SourceError) as info:
                open_bytes(ref.url, max_bytes=1 << 20)
            assert info.value.code == "corrupt_archive"
        else:
            assert open_bytes(ref.url, max_bytes=1 << 20) == members[_member(ref.url)]


@needs_proc_io
def test_a_compressed_tar_is_listed_as_it_is_read(tmp_path):
    """The first members come before the archive has been read: the workers start on
    them while the driver lists the rest."""
    members = {f"S0/IM{i:04d}": os.urandom(20_000) for i in range(1000)}
    path = _write(tmp_path / "a.tar.gz", "tar.gz", members)
    before = _bytes_read()
    listing = list_source(path)
    first = [next(listing) for _ in range(10)]
    read = _bytes_read() - before
    assert [_member(r.url) for r in first] == list(members)[:10]
    assert read < path.stat().st_size // 4, (read, path.stat().st_size)
    assert len(list(listing)) == 990


def _damage(data: bytearray, how: str, offsets: list[int]) -> bytes:
    if how == "cut_in_a_header":
        return bytes(data[: offsets[5] + 100])
    if how == "cut_at_a_member_boundary":
        return bytes(data[: offsets[5]])
    if how == "garbled_header":
        data[offsets[5] : offsets[5] + 512] = b"\x07" * 512
        return bytes(data)
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["cut_in_a_header", "cut_at_a_member_boundary", "garbled_header"])
def test_a_tar_that_tarfile_would_end_quietly_is_damaged(tmp_path, how):
    """Python's tarfile takes a header cut short, garbled or missing for the end of the
    archive and lists no more: the members after it would vanish without a word."""
    members = {f"S0/IM{i:03d}": bytes([i]) * 3000 for i in range(10)}
    path = _write(tmp_path / "a.tar", "tar", members)
    with tarfile.open(path) as archive:
        offsets = [info.offset for info in archive]
    path.write_bytes(_damage(bytearray(path.read_bytes()), how, offsets))
    with tarfile.open(path) as archive:  # what tarfile makes of it: 5 members, no error
        assert len(archive.getmembers()) == 5
    *refs, problem = list_source(path)
    assert [_member(r.url) for r in refs] == list(members)[:5]
    assert problem.code == "corrupt_archive" and "after 5 members" in problem.message


def test_a_tar_cut_within_its_end_blocks_is_whole_and_a_bad_gzip_checksum_is_not(tmp_path):
    members = {f"IM{i}": os.urandom(400_000) for i in range(4)}  # output before the end
    path = _write(tmp_path / "a.tar", "tar", members)
    with tarfile.open(path) as archive:
        end = max(i.offset_data + -(-i.size // 512) * 512 for i in archive)
    path.write_bytes(path.read_bytes()[: end + 512])  # one end-of-archive block of two
    assert [_member(r.url) for r in list_source(path)] == list(members)
    data = bytearray(gzip.compress(_write(tmp_path / "b.tar", "tar", members).read_bytes()))
    data[-8] ^= 0xFF  # the gzip trailer's CRC-32
    (tmp_path / "b.tar.gz").write_bytes(bytes(data))
    *refs, problem = list_source(tmp_path / "b.tar.gz")
    assert [_member(r.url) for r in refs] == list(members)
    assert problem.code == "corrupt_archive"


class _Unseekable(io.RawIOBase):
    """A write-only stream: zipfile then writes each member's sizes and CRC in a data
    descriptor after its data, as streaming zip writers do."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.data += b
        return len(b)


def _zip_bytes(members: dict[str, bytes], how: str) -> bytes:
    target = _Unseekable() if how == "descriptor" else io.BytesIO()
    method = zipfile.ZIP_STORED if how == "stored" else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(target, "w", compression=method) as archive:
        for name, data in members.items():
            with archive.open(name, "w", force_zip64=how == "zip64") as handle:
                handle.write(data)
    return bytes(target.data) if how == "descriptor" else target.getvalue()


def _whole_before(whole: bytes, cut: int) -> list[str]:
    """The reference: the members whose local header, data and descriptor all lie before
    the cut, from the whole archive's central directory (each ends where the next begins,
    the last where the directory does)."""
    with zipfile.ZipFile(io.BytesIO(whole)) as archive:
        infos = archive.infolist()
        ends = [i.header_offset for i in infos[1:]] + [archive.start_dir]
    listed = []
    for info, end in zip(infos, ends, strict=True):
        if end > cut:
            break
        listed.append(info.filename)
    return listed


@pytest.mark.parametrize("how", ["deflated", "stored", "descriptor", "zip64"])
@pytest.mark.parametrize("fraction", [0.3, 0.62, 0.97])
def test_a_cut_zip_lists_its_whole_members_then_fails(tmp_path, how, fraction):
    """A zip cut short has lost its central directory (at the end): its members are found
    from their local headers, each checked against its CRC-32, up to the cut."""
    members = {f"S0/IM{i:03d}": os.urandom(9_000) + bytes(30_000) for i in range(30)}
    whole = _zip_bytes(members, how)
    path = tmp_path / "a.zip"
    path.write_bytes(whole[: int(len(whole) * fraction)])
    expected = _whole_before(whole, path.stat().st_size)
    assert expected, "the cut leaves members"
    *refs, problem = list_source(path)
    assert [_member(r.url) for r in refs] == expected
    assert (problem.url, problem.code) == (str(path), "corrupt_archive")
    assert f"after {len(expected)} members" in problem.message
    for ref in random.Random(4).sample(refs, len(refs)):
        assert open_bytes(ref.url, max_bytes=1 << 20) == members[_member(ref.url)]


def test_a_cut_zip_with_a_bad_crc_stops_there(tmp_path):
    members = {f"IM{i}": bytes([i]) * 5000 for i in range(6)}
    whole = bytearray(_zip_bytes(members, "stored"))
    with zipfile.ZipFile(io.BytesIO(bytes(whole))) as archive:
        third = archive.getinfo("IM3")
    at = third.header_offset + 30 + len("IM3") + 100  # inside IM3's stored data
    whole[at] ^= 0xFF
    path = tmp_path / "a.zip"
    path.write_bytes(bytes(whole[: len(whole) - 60]))  # and cut in the central directory
    *refs, problem = list_source(path)
    assert [_member(r.url) for r in refs] == ["IM0", "IM1", "IM2"]
    assert problem.code == "corrupt_archive" and "BadZipFile" in problem.message
    with pytest.raises(SourceError) as info:  # a worker asked for it checks the CRC too
        open_bytes(f"zip://IM3::{path}", max_bytes=1 << 20)
    assert info.value.code == "corrupt_archive"


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_a_chained_url_lists_that_part_of_the_archive(tmp_path, kind):
    """``zip://S0::a.zip`` (a folder of the archive) and ``zip://S0/IM0000.dcm::a.zip``
    (one member) list those members under the URLs the whole archive gives them; the
    member reads as extracted. A member that is not there, or a protocol that is not the
    archive's, is a coded error."""
    path = _write(tmp_path / f"a.{kind}", kind, _members(20))
    protocol = "zip" if kind == "zip" else "tar"
    whole = {ref.url for ref in list_source(path)}
    folder = [ref.url for ref in list_source(f"{protocol}://S0/::{path}")]
    assert folder and set(folder) == {u for u in whole if _member(u).startswith("S0/")}
    (one,) = list_source(f"{protocol}://S1/IM0001.dcm::{path}")
    assert one.url in whole
    assert open_bytes(one.url, max_bytes=1 << 20) == _extracted(path)["S1/IM0001.dcm"]
    with pytest.raises(SourceError) as missing:
        list(list_source(f"{protocol}://S1/IM9999.dcm::{path}"))
    assert missing.value.code == "source_not_found"
    other = "tar" if protocol == "zip" else "zip"
    with pytest.raises(SourceError) as wrong:
        list(list_source(f"{other}://S0::{path}"))
    assert wrong.value.code == "bad_source"
