"""Configuration: frozen keyword-only dataclasses, read from TOML and ``VOXLAKE_*`` at the edge.

Library code receives these objects explicitly; only the CLI reads files and the
environment (:func:`load_config`). Every key is documented in ``docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from voxlake.errors import ConfigError, SecretMissingError

__all__ = [
    "DEMO_SECRET",
    "DeidConfig",
    "IngestConfig",
    "PreprocessConfig",
    "StoreConfig",
    "load_config",
    "resolve_secret",
]

#: Secret used only by ``voxlake demo`` and sample data; never for real archives.
DEMO_SECRET = "voxlake-demo-secret-not-for-real-data"


@dataclass(frozen=True, kw_only=True)
class DeidConfig:
    """De-identification options (DICOM PS3.15 Annex E, Basic Profile).

    Attributes
    ----------
    date_mode
        ``"shift"``: dates move by a per-patient offset derived from the secret (intervals
        between a patient's studies are preserved); ``"year"``: keep only the year;
        ``"remove"``: drop dates.
    max_date_shift_days
        Offsets are drawn in ``[-max, +max]`` days (never 0 when max > 0).
    keep_descriptions
        Keep StudyDescription, SeriesDescription, ProtocolName and similar free text.
        Scientists select series by them, but a technologist may have typed a name there.
    keep_private_tags
        Keep private (odd-group) elements. Off by default: vendors put names in them.
    """

    date_mode: Literal["shift", "year", "remove"] = "shift"
    max_date_shift_days: int = 365
    keep_descriptions: bool = True
    keep_private_tags: bool = False


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """Layout of the OME-Zarr volume store.

    Attributes
    ----------
    chunk
        Edge of cube-ish chunks (voxels); random patches read only the chunks they touch.
    shard_depth
        Slices per shard along z; a shard spans the whole (y, x) plane so object storage
        holds few large objects.
    codec
        ``"blosc-lz4"`` (byte shuffle; the default), ``"blosc-zstd"`` (byte shuffle) or
        ``"zstd"``. Measured on 64^3 chunks of CT phantoms (``benchmarks/stream.py``),
        one core: blosc-lz4 level 1 stores 3.0x smaller and decodes at ~5 GB/s;
        blosc-zstd level 1 stores 4.0x smaller but decodes at ~1.1 GB/s. Training reads
        every volume many times, so decoding speed wins; pick ``"blosc-zstd"`` where
        storage cost matters more.
    clevel
        Compression level.
    """

    chunk: int = 64
    shard_depth: int = 128
    codec: Literal["blosc-lz4", "blosc-zstd", "zstd"] = "blosc-lz4"
    clevel: int = 1


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """Optional preprocessing steps run on the workers (recorded per volume).

    Attributes
    ----------
    target_spacing
        Resample to this (z, y, x) spacing in mm, e.g. ``(1.0, 1.0, 1.0)``; None keeps the
        acquired grid. The field of view is preserved; linear interpolation gives float32.
    interpolation
        ``"linear"`` or ``"nearest"`` for resampling.
    clip
        Clip values to ``(low, high)``, e.g. a HU window ``(-1000, 1000)``.
    n4
        N4 bias-field correction of MR volumes (needs the ``mr`` extra: SimpleITK).
    crop_threshold
        Crop to the bounding box of voxels above this value (e.g. ``-500`` HU drops air).
    pyramid_levels
        Extra OME-Zarr multiscale levels (each 2x smaller) written next to level ``0``.
    """

    target_spacing: tuple[float, float, float] | None = None
    interpolation: Literal["linear", "nearest"] = "linear"
    clip: tuple[float, float] | None = None
    n4: bool = False
    crop_threshold: float | None = None
    pyramid_levels: int = 0

    @property
    def enabled(self) -> bool:
        """True when any step is configured."""
        return bool(
            self.target_spacing
            or self.clip
            or self.n4
            or self.crop_threshold is not None
            or self.pyramid_levels
        )


@dataclass(frozen=True, kw_only=True)
class IngestConfig:
    """Options for one ingest run.

    Attributes
    ----------
    secret
        Keyed-hash secret for ``patient_key`` etc. Required (env ``VOXLAKE_SECRET``).
    workers
        Local Dask worker processes when no scheduler is given.
    threads_per_worker
        Threads per local worker.
    memory_limit
        Memory limit per local worker (Dask syntax, e.g. ``"4GiB"``).
    scheduler
        Address of an existing Dask scheduler (``tcp://host:8786``); overrides ``workers``.
    dashboard_address
        Where a local cluster serves its dashboard (``":0"`` picks a free port).
    batch_size
        Files per catalog commit of header rows. Each header-parsing task takes a quarter
        of it, at least 16 and at most 256 files (fewer files than this are split so
        that every worker gets two tasks); each commit costs the driver about 80 ms and
        writes one small Parquet file.
    read_ahead
        Files a header task reads ahead of the one it parses: in threads, or on local
        disks by the kernel (``POSIX_FADV_WILLNEED``, where available; at most 64 files
        open ahead). None (default):
        2 on local disks, 8 from object storage or a PACS (a round trip each), 1 inside
        zip and tar archives (always one reading thread there). 0 reads one file at a
        time. With a PACS, each worker keeps up to this many WADO-RS requests in flight:
        lower it to spare a busy server. Volume tasks read one-slice files from object
        storage or a PACS as far ahead (None: 8).
    pacs_cache_bytes
        Bytes of PACS instances (DICOMweb, DIMSE) each worker keeps on its local disk
        between the header and the volume stage of a run, so that the PACS sends each
        instance once: the volume task of a series runs where its instances were kept.
        Beyond it (or with less than 1 GiB free there) an instance is retrieved again
        by its volume task. Removed at the end of the run. 0: keep nothing.
    on_error
        ``"quarantine"`` records a failure row and goes on; ``"raise"`` stops the run.
    headers_only
        Catalog the files only: parse and de-identify their headers into ``instances``
        (and file failures into ``failures``), plan and build no volume, need no volume
        store. A later run without it builds the volumes from the catalog without
        reading unchanged files' headers again (native slices are read at the pixel
        offsets the survey kept).
    prune
        Delete the catalog rows of files that were catalogued under one of the run's
        sources and that its listing no longer finds (deleted, moved or renamed); the
        volumes built from them are then retired, or rebuilt from the series' remaining
        files. Without it such files keep their rows and the run only counts them
        (``files_missing``). A source that lists no file at all is never pruned (a share
        that is not mounted must not empty the catalog), nor is anything under a folder
        or archive the listing could not read whole. A ``--headers-only`` run prunes the
        file rows; the next full run retires their volumes.
    max_voxels
        Refuse (before allocating) any volume declaring more voxels than this.
    max_file_bytes
        Refuse files (or decompressed members) larger than this.
    spacing_tolerance
        Relative tolerance on slice spacing uniformity.
    philips_scaling
        ``"display"`` (default): Philips values through the DICOM rescale, like every
        other vendor; ``"precise"``: Philips floating-point values, display / (RS * SS)
        with the private scale slope, as dcm2niix writes them by default.
    resample_irregular
        Also write an equidistant, linearly resampled copy (labelled ``resampled``) of a
        stack whose slice spacing varies; without it such a stack is only an
        ``irregular_spacing`` failure (an affine cannot describe uneven slices).
    deid
        De-identification options.
    store
        Volume-store layout.
    preprocess
        Optional preprocessing steps (``[ingest.preprocess]`` in TOML).
    storage_options
        fsspec options for sources. ``voxlake ingest`` uses them for the catalog and the
        store too, unless the two keys below are set.
    catalog_storage_options
        Options for the catalog alone (delta-rs or fsspec style), when it lives elsewhere
        than the sources: another endpoint or other credentials. ``{}``: none at all.
    store_storage_options
        Options for the volume store alone (fsspec). ``{}``: none at all.
    key_map_url
        Optional location (local path or ``s3://``) of a Delta table mapping every key
        (``patient_key``, ``study_key``, ``accession_key``, ...) back to the original
        identifier it was made from. Off by default. The table is identifying: it is
        written only there, and a location inside (or containing) the catalog or the
        store is refused. Keep it with the original archive, under the same access rules.
    """

    secret: str | None = None
    workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str = "4GiB"
    scheduler: str | None = None
    dashboard_address: str = ":8787"
    batch_size: int = 1024
    read_ahead: int | None = None
    pacs_cache_bytes: int = 8 * 1024**3
    on_error: Literal["quarantine", "raise"] = "quarantine"
    headers_only: bool = False
    prune: bool = False
    max_voxels: int = 2_000_000_000
    max_file_bytes: int = 4 * 1024**3
    spacing_tolerance: float = 0.05
    philips_scaling: Literal["display", "precise"] = "display"
    resample_irregular: bool = False
    deid: DeidConfig = field(default_factory=DeidConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    storage_options: dict[str, Any] | None = None
    catalog_storage_options: dict[str, Any] | None = None
    store_storage_options: dict[str, Any] | None = None
    key_map_url: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError("workers must be at least 1", workers=self.workers)
        if self.batch_size < 1:
            raise ConfigError("batch_size must be at least 1", batch_size=self.batch_size)
        if self.read_ahead is not None and self.read_ahead < 0:
            raise ConfigError("read_ahead must be 0 or more", read_ahead=self.read_ahead)
        if self.pacs_cache_bytes < 0:
            raise ConfigError(
                "pacs_cache_bytes must be 0 or more", pacs_cache_bytes=self.pacs_cache_bytes
            )
        if self.on_error not in ("quarantine", "raise"):
            raise ConfigError(f"on_error must be 'quarantine' or 'raise', not {self.on_error!r}")
        if not _is_memory_limit(self.memory_limit):
            # Checked here, not by Dask as the cluster starts (after the run was opened).
            raise ConfigError(
                f"memory_limit {self.memory_limit!r} is not a size",
                hint="e.g. 4GiB, 1500MB, a fraction of this machine's memory (0.25), auto, or "
                "0 for no limit",
            )

    def require_secret(self) -> str:
        """Return the secret or raise :class:`SecretMissingError`."""
        return resolve_secret(self.secret)


def _is_memory_limit(value: object) -> bool:
    """Whether Dask reads ``value`` as a worker memory limit (a size, a fraction, auto)."""
    text = str(value).strip()
    if not any(c.isdigit() for c in text):  # Dask reads "GiB" (and "") as 1 GiB (1 byte)
        return text.lower() == "auto"
    try:
        return float(text) >= 0
    except ValueError:
        pass
    from dask.utils import parse_bytes

    try:
        return parse_bytes(text) > 0
    except ValueError:
        return False


def resolve_secret(secret: str | None) -> str:
    """Return ``secret``, falling back to ``VOXLAKE_SECRET``; raise if neither is set."""
    value = secret if secret else os.environ.get("VOXLAKE_SECRET")
    if not value:
        raise SecretMissingError(
            "no de-identification secret configured",
            hint="set VOXLAKE_SECRET or pass --secret; keep it out of the catalog and code",
        )
    return value


_SECTIONS: dict[str, type[Any]] = {
    "deid": DeidConfig,
    "store": StoreConfig,
    "preprocess": PreprocessConfig,
}


def _coerce(cls: type[Any], data: dict[str, Any]) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))}",
            hint="see docs/configuration.md for every key",
        )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS and isinstance(value, dict):
            kwargs[key] = _coerce(_SECTIONS[key], value)
        elif key in ("shape", "target_spacing", "clip") and isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"invalid {cls.__name__}: {exc}") from exc


_ENV_INGEST = {
    "VOXLAKE_SECRET": ("secret", str),
    "VOXLAKE_WORKERS": ("workers", int),
    "VOXLAKE_SCHEDULER": ("scheduler", str),
    "VOXLAKE_BATCH_SIZE": ("batch_size", int),
    "VOXLAKE_READ_AHEAD": ("read_ahead", int),
    "VOXLAKE_PACS_CACHE_BYTES": ("pacs_cache_bytes", int),
    "VOXLAKE_MEMORY_LIMIT": ("memory_limit", str),
}


def load_config(
    path: str | os.PathLike[str] | None = None, *, env: dict[str, str] | None = None
) -> IngestConfig:
    """Read an :class:`IngestConfig` from a TOML file (``[ingest]`` table) and ``VOXLAKE_*``.

    Environment variables override the file; explicit CLI flags override both (the CLI
    applies them with :func:`dataclasses.replace`).
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        data = dict(raw.get("ingest", {}))
    environ = os.environ if env is None else env
    for var, (key, kind) in _ENV_INGEST.items():
        if environ.get(var):
            try:
                data[key] = kind(environ[var])
            except ValueError as exc:
                raise ConfigError(f"{var} must be {kind.__name__}") from exc
    return _coerce(IngestConfig, data)  # type: ignore[no-any-return]
