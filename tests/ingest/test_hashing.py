"""Content hashes: BLAKE3 ("b3:" prefix) now, BLAKE2b-128 values of older catalogs still checked."""

from __future__ import annotations

import hashlib

import blake3
import pytest

from voxlake.config import IngestConfig
from voxlake.ingest.hashing import content_hash, hash_matches
from voxlake.ingest.headers import read_headers
from voxlake.ingest.sources import FileRef, list_source

DATA = bytes(range(256)) * 2048 + b"tail"  # 512 KiB and a bit: several BLAKE3 chunks


def _legacy(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def test_content_hash_is_prefixed_blake3_128() -> None:
    value = content_hash(DATA)
    assert value == "b3:" + blake3.blake3(DATA).hexdigest()[:32]
    assert len(value) == 35
    assert content_hash(b"") == "b3:" + blake3.blake3(b"").hexdigest(length=16)
    assert content_hash(DATA) != content_hash(DATA[:-1])


def test_new_and_legacy_values_match_their_bytes() -> None:
    assert hash_matches(DATA, content_hash(DATA))
    assert hash_matches(DATA, _legacy(DATA))  # written by an earlier version


@pytest.mark.parametrize("stored", [content_hash(DATA), _legacy(DATA)], ids=["b3", "legacy"])
def test_changed_bytes_are_rejected(stored: str) -> None:
    changed = bytearray(DATA)
    changed[100_000] ^= 1
    assert not hash_matches(bytes(changed), stored)
    assert not hash_matches(DATA[:-1], stored)
    assert not hash_matches(DATA + b"\0", stored)


def test_malformed_stored_values_match_nothing() -> None:
    digest = blake3.blake3(DATA).hexdigest(length=16)
    for stored in ("", "b3:", digest[:31], "b2:" + _legacy(DATA), "B3:" + digest):
        assert not hash_matches(DATA, stored), stored
    # a bare BLAKE3 digest is not taken for a legacy BLAKE2b one
    assert not hash_matches(DATA, digest)


def test_header_pass_records_blake3_of_each_file(tiny_sample) -> None:
    refs = [ref for ref in list_source(tiny_sample.root / "dicom") if isinstance(ref, FileRef)]
    refs = refs[:12]
    batch = read_headers(refs, secret="s", config=IngestConfig(secret="s"), run_id="r")
    assert len(batch.instances) == len(refs)
    for row in batch.instances:
        with open(row["url"], "rb") as handle:
            data = handle.read()
        assert row["content_hash"] == "b3:" + blake3.blake3(data).hexdigest()[:32]
    assert batch.pixel_spans  # the volume stage checks files against this same value
    for url, span in batch.pixel_spans.items():
        row = next(r for r in batch.instances if r["url"] == url)
        assert span.content_hash == row["content_hash"]
