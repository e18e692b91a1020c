"""The ingest driver: list, parse headers on workers, commit, plan, build volumes, commit.

The driver never touches pixel data and workers never write the catalog. A volume becomes
visible only when its catalog row is committed, after its Zarr group is complete. Every
step is idempotent: files already catalogued with the same size and mtime are not read
again, plans whose revision is already committed are not rebuilt, and rows merge on keys.
So a run killed anywhere leaves the catalog at its last commit and a re-run finishes it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

from voxlake.cluster import dask_client
from voxlake.config import IngestConfig
from voxlake.errors import ConfigError, VoxlakeError
from voxlake.ingest._header_stage import HeaderStage
from voxlake.ingest._volume_stage import VolumeStage
from voxlake.ingest.report import IngestReport, ProgressEvent, ProgressHandler

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

__all__ = ["ingest"]


class _Run(HeaderStage, VolumeStage):
    """State of one run on the driver: the header stage, then the volume stage."""


def _absolute(url: str | os.PathLike[str]) -> str:
    """Local paths become absolute (volume rows must be readable from any folder)."""
    text = os.fspath(url)
    return text if "://" in text else os.path.abspath(text)


def ingest(
    sources: Sequence[str | os.PathLike[str]],
    *,
    catalog: str | os.PathLike[str],
    store: str | os.PathLike[str] | None = None,
    config: IngestConfig | None = None,
    client: Any = None,
    catalog_storage_options: dict[str, Any] | None = None,
    store_storage_options: dict[str, Any] | None = None,
    progress: ProgressHandler | None = None,
) -> IngestReport:
    """Ingest DICOM sources into a catalog and a volume store.

    Parameters
    ----------
    sources
        Folders, files or fsspec URLs to crawl.
    catalog
        Catalog root URL (created when missing).
    store
        Volume store root URL (created when missing); may be left out only with
        ``config.headers_only``.
    config
        Run options; ``config.secret`` or ``VOXLAKE_SECRET`` must be set.
    client
        An existing ``distributed.Client``; default: a cluster from ``config``.
    catalog_storage_options, store_storage_options
        Options for remote catalog (delta-rs) and store (fsspec); default:
        ``config.catalog_storage_options`` and ``config.store_storage_options``.
    progress
        Called with :class:`ProgressEvent` s.

    Returns
    -------
    IngestReport
        Counts, failures by code, bytes, duration and the catalog version reached.

    Examples
    --------
    >>> report = ingest(["dicom/"], catalog="catalog", store="volumes.zarr",
    ...                 config=IngestConfig(secret="..."))  # doctest: +SKIP
    """
    config = config or IngestConfig()
    if store is None and not config.headers_only:
        raise ConfigError(
            "a volume store is needed to build volumes",
            hint="pass store=... (--store), or set headers_only (--headers-only) to "
            "catalog the files without building volumes",
        )
    if catalog_storage_options is None:
        catalog_storage_options = config.catalog_storage_options
    if store_storage_options is None:
        store_storage_options = config.store_storage_options
    run = _Run(
        [os.fspath(s) for s in sources],
        catalog=_absolute(catalog),
        store=_absolute(store) if store is not None else "",
        config=config,
        catalog_storage_options=catalog_storage_options,
        store_storage_options=store_storage_options,
        progress=progress,
    )
    run.commit({"runs": [run.run_row("running")]}, "run start")
    try:
        with dask_client(config, client=client) as dask:
            run.report.dashboard_link = getattr(dask, "dashboard_link", None)
            run.progress(ProgressEvent("cluster", 0, None, message=run.report.dashboard_link))
            try:
                run.headers(dask)
                run.check_sources()
                run.prune()
                if not config.headers_only:
                    run.volumes(run.plan_and_submit(dask))
            finally:
                run.drop_kept(dask)
        # In the try: a Ctrl-C after the last volume but before this commit left 'running'.
        return run.finish("completed")
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM through the CLI ("stopped by SIGTERM")
        with _interrupts_held():
            run.finish("interrupted", str(exc) or "interrupted by the user")
        raise
    except VoxlakeError as exc:
        with _interrupts_held():
            run.finish("failed", f"{exc.code}: {exc.message}")
        raise
    except Exception as exc:
        with _interrupts_held():
            run.finish("failed", f"{type(exc).__name__}")
        raise


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold off Ctrl-C (and the CLI's SIGTERM) while the run's last row is committed.

    A second Ctrl-C during the commit of a stopping run aborted it and left the run
    ``running`` for good: an impatient user's, or ``timeout -s INT``'s, which signals the
    process and then its whole group (the process again). The run is stopping already, so
    a signal that arrives meanwhile is dropped. SIG_DFL and SIG_IGN stay as they are (a
    second SIGTERM through the CLI still ends the process at once).
    """
    if threading.current_thread() is not threading.main_thread():  # only it sets handlers
        yield
        return
    held = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if callable(handler):
            held[signum] = handler
            signal.signal(signum, _drop)
    try:
        yield
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)


def _drop(signum: int, frame: object) -> None:
    """A signal handler that does nothing."""
