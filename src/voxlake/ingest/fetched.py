"""PACS instances retrieved once per run.

Without this, a PACS would send every instance twice: to the header task that catalogues
it and to the volume task that decodes its pixels. Instead the header task keeps the bytes
it retrieved on its worker's local disk, the driver sends the volume task of the series to
that worker (a loose placement: another worker still runs it, retrieving again, when that
one is gone), and the volume task reads them from there. The bytes are those the header
task hashed and catalogued, so the volume is built from exactly the catalogued instances.

Where and how much: under the Dask worker's local directory (``voxlake-fetched/<run
id>``, mode 0700: the files are the PACS's originals, identifying), at most
``IngestConfig.pacs_cache_bytes`` per worker process and never the disk's last
:data:`DISK_RESERVE` bytes; an instance that does not fit is simply retrieved again. The
driver removes the run's folder from every worker when the run ends; a driver killed
mid-run leaves it until the worker closes (Dask removes a worker's local directory then)
or until a later run keeps instances on that worker more than :data:`STALE_SECONDS`
after it last changed (removing a live run's folder would only make its volume tasks
retrieve again). Outside a Dask worker nothing is kept.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Final

__all__ = [
    "DISK_RESERVE",
    "STALE_SECONDS",
    "current_worker",
    "drop",
    "keep",
    "kept_bytes",
    "recall",
    "worker_address",
]

#: Free disk space a kept instance never takes.
DISK_RESERVE: Final = 1 << 30
#: Folders of other runs unchanged for this long are removed (left by killed drivers).
STALE_SECONDS: Final = 2 * 24 * 3600
_FOLDER: Final = "voxlake-fetched"

_lock = threading.Lock()
_used: dict[str, int] = {}  # bytes kept per run in this process


def current_worker() -> Any:
    """The Dask worker running the calling task, or None (outside a worker, and in threads
    a task starts itself: capture it in the task's own thread)."""
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def worker_address() -> str | None:
    """The address of the Dask worker running the caller (None outside one)."""
    worker = current_worker()
    return None if worker is None else str(worker.address)


def _folder(run_id: str, dask_worker: Any = None) -> Path | None:
    """The run's folder on this worker (``client.run`` passes `dask_worker`: outside a
    task, Dask does not tell a function which worker runs it)."""
    worker = dask_worker or current_worker()
    if worker is None:
        return None
    return Path(worker.local_directory) / _FOLDER / run_id


def _name(locator: str) -> str:
    return hashlib.blake2b(locator.encode(), digest_size=16).hexdigest()


def keep(run_id: str, locator: str, data: bytes, *, budget: int) -> bool:
    """Keep the bytes of the instance at `locator` for this run's volume tasks on this
    worker; False when they were not kept (outside a worker, over the budget, disk full)."""
    folder = _folder(run_id)
    if folder is None or budget <= 0:
        return False
    with _lock:
        if _used.get(run_id, 0) + len(data) > budget:
            return False
        _used[run_id] = _used.get(run_id, 0) + len(data)
    try:
        if not folder.exists():
            _remove_stale(folder.parent)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if shutil.disk_usage(folder).free < len(data) + DISK_RESERVE:
            raise OSError("no room")
        part = folder / f"{_name(locator)}.{threading.get_ident()}.part"
        part.write_bytes(data)
        os.replace(part, folder / _name(locator))  # whole or absent
    except OSError:
        with _lock:
            _used[run_id] -= len(data)
        return False
    return True


def _remove_stale(root: Path) -> None:
    """Remove the folders under `root` unchanged for :data:`STALE_SECONDS`."""
    import time

    try:
        folders = list(root.iterdir())
    except OSError:
        return
    for folder in folders:
        try:
            stale = time.time() - folder.stat().st_mtime > STALE_SECONDS
        except OSError:
            continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            with _lock:
                _used.pop(folder.name, None)


def recall(run_id: str, locator: str, dask_worker: Any = None) -> bytes | None:
    """The bytes kept for `locator` in this run on this worker (`dask_worker`, default
    the one running the calling task), or None."""
    folder = _folder(run_id, dask_worker)
    if folder is None:
        return None
    try:
        return (folder / _name(locator)).read_bytes()
    except OSError:
        return None


def kept_bytes(run_id: str) -> int:
    """Bytes this worker process keeps for the run."""
    with _lock:
        return _used.get(run_id, 0)


def drop(run_id: str, dask_worker: Any = None) -> None:
    """Remove what this worker keeps for the run (the driver calls it with ``client.run``
    on the workers that kept instances, at the end of the run)."""
    folder = _folder(run_id, dask_worker)
    with _lock:
        _used.pop(run_id, None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
