"""A corpus of hostile inputs: broken, malicious and odd files next to good series.

:func:`build_corpus` writes every kind of bad input an archive can hold and says for each
what a correct ingest makes of it: a ``failures`` row with a given code, a volume equal to
the generator's, or a non-image instance (``docs/reliability.md`` has the table). Nothing
is committed as a binary: the corpus is a pure function of the seed, written in seconds.
The cases themselves are in :mod:`voxlake.testing._hostile_cases`.

Ingest ``corpus.archive`` with ``max_file_bytes=MAX_FILE_BYTES`` and
``max_voxels=MAX_VOXELS``. The cases marked ``unprivileged`` (unreadable files and
folders) live under ``corpus.perm``: ingest that in a process without root's permission
override, or they mean nothing.

Every identifying value written into a header contains ``VXLH`` or is a UID, and is
listed in ``HostileCorpus.planted`` so tests can byte-scan outputs for leaks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from voxlake.testing.phantoms import SeriesSpec, derive_uid
from voxlake.testing.synthetic import WrittenSeries, write_series

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import pydicom

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_VOXELS",
    "HostileCase",
    "HostileCorpus",
    "build_corpus",
    "catalog_url",
]

#: ``IngestConfig.max_file_bytes`` of the corpus run (the size-cap cases exceed it).
MAX_FILE_BYTES = 2 * 1024 * 1024
#: ``IngestConfig.max_voxels`` of the corpus run (the declared-size cases exceed it).
MAX_VOXELS = 4_000_000

Outcome = Literal["failure", "volume", "non_image"]


@dataclass(frozen=True)
class HostileCase:
    """One kind of hostile input and what a correct ingest makes of it.

    Attributes
    ----------
    name
        Stable ``snake_case`` identifier (docs and test ids).
    description
        What the input is.
    outcome
        ``"failure"``: the case's files or series become ``failures`` rows with exactly
        the ``codes``; ``"volume"``: the series is stored and equals ``written``'s
        expected volume; ``"non_image"``: an instance row with ``has_pixels = False``
        and no failure.
    codes
        Failure codes the case produces (all of them, nothing else).
    stage
        Where they are recorded: ``file`` (listing, header), ``assemble`` or ``volume``.
    urls
        Catalog URLs of the case's files (failure subjects at the file stage; instances).
    series_uids
        Original SeriesInstanceUIDs of the case's series.
    written
        For ``"volume"`` cases, the series and what a correct ingest stores.
    unprivileged
        Lives under ``corpus.perm``: needs a process without root's override.
    """

    name: str
    description: str
    outcome: Outcome
    codes: tuple[str, ...] = ()
    stage: str = "file"
    urls: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    written: WrittenSeries | None = None
    unprivileged: bool = False


@dataclass(frozen=True)
class HostileCorpus:
    """What :func:`build_corpus` wrote: the cases and every identifier it planted."""

    root: Path
    cases: tuple[HostileCase, ...]
    planted: tuple[str, ...] = ()

    @property
    def archive(self) -> Path:
        """The folder to ingest (every case but the unprivileged ones)."""
        return self.root / "archive"

    @property
    def perm(self) -> Path:
        """The folder of the unprivileged cases."""
        return self.root / "perm"

    def case(self, name: str) -> HostileCase:
        """The case called ``name``."""
        for case in self.cases:
            if case.name == name:
                return case
        raise KeyError(name)


def catalog_url(path: str | os.PathLike[str]) -> str:
    """The URL the crawl records for a local file: its absolute path, or a percent-encoded
    ``file://`` URL when the path is not valid UTF-8."""
    text = os.path.abspath(os.fspath(path))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "file://" + urllib.parse.quote(os.fsencode(text), safe="/")
    return text


def build_corpus(root: str | os.PathLike[str], *, seed: int = 0) -> HostileCorpus:
    """Write the hostile corpus under ``root``; return every case and what it must become.

    Parameters
    ----------
    root
        An empty (or missing) folder.
    seed
        Fixes the pixels and the random bytes: same seed, same files.
    """
    from voxlake.testing._hostile_cases import SECTIONS

    builder = Builder(Path(root), seed)
    for section in SECTIONS:
        section(builder)
    return HostileCorpus(Path(root), tuple(builder.cases), tuple(builder.planted))


# -- building blocks (used by voxlake.testing._hostile_cases) ----------------------------


def spec_for(name: str, **changes: Any) -> SeriesSpec:
    """A small CT series (4 slices of 16x16) whose identifiers derive from ``name``."""
    token = str(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 10**6).zfill(6)
    spec = SeriesSpec(
        patient_id=f"VXLHPID{token}",
        patient_name=f"HOSTILE^CASE^VXLH{token}",
        patient_birth_date="19700101",
        patient_sex="O",
        patient_age="054Y",
        study_instance_uid=derive_uid(name, "study"),
        series_instance_uid=derive_uid(name, "series"),
        accession_number=f"VXLHACC{token}",
        study_id=f"VXLHST{token}",
        study_date="20240102",
        modality="CT",
        series_description=f"hostile {name}",
        series_number=2,
        rows=16,
        columns=16,
        n_slices=4,
        pixel_spacing=(2.0, 2.0),
        slice_spacing=2.0,
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        origin=(-16.0, -16.0, 10.0),
        rescale_slope=1.0,
        rescale_intercept=-1024.0,
        lesion=False,
        noise_sd=5.0,
        station_name=f"VXLHSTN{token}",
        device_serial_number=f"VXLHSN{token}",
        institution_name=f"VXLH HOSPITAL {token}",
        institution_address=f"1 VXLH WAY {token}",
        patient_address=f"2 VXLH LANE {token}",
        referring_physician_name=f"VXLHREF{token}^A",
        operators_name=f"VXLHOP{token}^B",
    )
    return dataclasses.replace(spec, **changes)


def cut_tar_members(whole: bytes, cut: bytes) -> tuple[list[str], str | None]:
    """What a correct reader lists from `cut`, a prefix of the tar `whole` (plain, gzip,
    bzip2 or xz): the members whose headers are whole, and the one of them whose data the
    cut runs through (None if none). Computed from the whole archive's member offsets
    (``tarfile``) and the bytes the prefix decompresses to (``zlib``, ``bz2``, ``lzma``),
    not by walking the cut archive."""
    import bz2
    import lzma
    import tarfile
    import zlib

    def decompressor() -> Any:  # the compression's own module, None for a plain tar
        if whole[:2] == b"\x1f\x8b":
            return zlib.decompressobj(31)
        if whole[:3] == b"BZh":
            return bz2.BZ2Decompressor()
        if whole[:6] == b"\xfd7zXZ\x00":
            return lzma.LZMADecompressor()
        return None

    first, second = decompressor(), decompressor()
    tar_bytes = whole if first is None else first.decompress(whole)
    available = len(cut) if second is None else len(second.decompress(cut))
    listed: list[str] = []
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
        for info in archive:
            if info.offset_data > available:
                break
            listed.append(info.name)
            if info.offset_data + info.size > available:
                return listed, info.name
    return listed, None


def read_dicom(path: Path) -> pydicom.Dataset:
    """Read a file with pydicom (forced: some corpus files have no preamble)."""
    import pydicom

    return pydicom.dcmread(path, force=True)


def save_dicom(ds: pydicom.Dataset, target: Path | io.BytesIO) -> None:
    """Write ``ds`` as a DICOM file (implicit VR without file meta), warnings silenced:
    invalid values are the point here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "TransferSyntaxUID" in getattr(ds, "file_meta", {}):
            ds.save_as(target, enforce_file_format=True)
        else:
            ds.save_as(target, implicit_vr=True, little_endian=True)


def edit_dicom(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    """Read ``path``, apply ``change`` and write it back."""
    ds = read_dicom(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        change(ds)
    save_dicom(ds, path)


@dataclass
class Builder:
    """Collects cases and planted identifiers while the sections write files."""

    root: Path
    seed: int
    cases: list[HostileCase] = field(default_factory=list)
    planted: dict[str, None] = field(default_factory=dict)

    def folder(self, name: str, *, perm: bool = False) -> Path:
        """``root/archive/name`` (or ``root/perm/name``), created."""
        path = self.root / ("perm" if perm else "archive") / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def series(self, name: str, folder: Path | None = None, **changes: Any) -> WrittenSeries:
        """Write :func:`spec_for` ``(name, **changes)`` into its folder."""
        spec = spec_for(name, **changes)
        written = write_series(spec, folder or self.folder(name), seed=self.seed)
        self.plant(*(v for v in written.identifiers() if len(v) >= 6))
        return written

    def plant(self, *values: str) -> None:
        """Record identifying values written into a header."""
        self.planted.update(dict.fromkeys(values))

    def slice_bytes(self, name: str) -> bytes:
        """One valid slice of a series written aside (never ingested as such)."""
        return self.series(name, self.root / "scratch" / name).files[0].read_bytes()

    def file(
        self, name: str, description: str, code: str, data: bytes, *, filename: str = "x.dcm"
    ) -> Path:
        """A file-stage failure case of one file holding ``data``."""
        path = self.folder(name) / filename
        path.write_bytes(data)
        self.listed(name, description, code, catalog_url(path))
        return path

    def listed(self, name: str, description: str, code: str, *urls: str, **kw: Any) -> None:
        """A file-stage failure case whose failing URLs are ``urls``."""
        self.cases.append(HostileCase(name, description, "failure", (code,), "file", urls, **kw))

    def failing_series(
        self,
        name: str,
        description: str,
        codes: Sequence[str],
        change: Callable[[WrittenSeries], None],
        stage: str = "assemble",
        **spec: Any,
    ) -> None:
        """A series written clean, then broken by ``change``; it fails with ``codes``."""
        written = self.series(name, **spec)
        change(written)
        self.series_fails(name, description, codes, written, stage)

    def series_fails(
        self,
        name: str,
        description: str,
        codes: Sequence[str],
        written: WrittenSeries,
        stage: str = "assemble",
    ) -> None:
        """A case whose series ``written`` fails as a whole with ``codes``."""
        uids = (written.spec.series_instance_uid,)
        self.cases.append(HostileCase(name, description, "failure", tuple(codes), stage, (), uids))

    def volume(self, name: str, description: str, written: WrittenSeries) -> None:
        """A case whose series must be stored exactly as generated."""
        uids = (written.spec.series_instance_uid,)
        self.cases.append(HostileCase(name, description, "volume", (), "volume", (), uids, written))

    def non_image(self, name: str, description: str, url: str) -> None:
        """A case catalogued as an instance without pixels, not a failure."""
        self.cases.append(HostileCase(name, description, "non_image", (), "file", (url,)))
