"""Get a Dask client: a local cluster of worker processes by default, or an address."""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import TYPE_CHECKING, Any

from voxlake.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from voxlake.config import IngestConfig

__all__ = ["dask_client"]

logger = logging.getLogger(__name__)

#: glibc malloc settings of the local cluster's worker processes. Dask sets
#: ``MALLOC_TRIM_THRESHOLD_=65536`` there, which also switches off glibc's adaptive mmap
#: threshold: every buffer over 128 KiB (each file read, each encoded chunk) is then a
#: fresh mmap whose pages fault in one by one, and the header pass runs 1.4x slower than
#: in a plain process (docs/performance.md). With these, buffers up to 4 MiB reuse heap
#: memory (at most 8 MiB kept free at its top) while slabs and volumes (larger) are still
#: mapped and returned to the system when freed, so worker memory stays bounded. Arrow
#: allocates from the same heap (its default, mimalloc, kept each header task's table
#: memory: 8 MB more per worker after a 256-file task, carried into the volume stage).
WORKER_MALLOC_ENV = {
    "MALLOC_TRIM_THRESHOLD_": 8 << 20,
    "MALLOC_MMAP_THRESHOLD_": 4 << 20,
    "ARROW_DEFAULT_MEMORY_POOL": "system",
}


#: What the local cluster's workers import before they start: once, in the forkserver
#: process they are forked from, instead of once per worker (each spawned worker spent
#: about 1 CPU second importing these; docs/performance.md).
WORKER_PRELOAD = (
    "distributed",
    "voxlake.ingest.headers",
    "voxlake.ingest.header_json",
    "voxlake.ingest.header_template",
    "voxlake.ingest.readers.dicom",
    "voxlake.volumes.writer",
    "pydicom",
    "zarr",
    "numcodecs.blosc",
    "pyarrow",
    # Not pandas (pyarrow imports it at a worker's first conversion of rows): imported
    # here, it left the forked workers faulting in fresh pages for every file read
    # (tests/ingest/test_cluster.py).
    "voxlake._gc_freeze",  # last: freezes what the imports above made
)


#: Worker preload: the local cluster's workers leave Ctrl-C to the driver (see there).
_QUIET = "voxlake._worker_signals"


def _forkserver_available() -> bool:
    import multiprocessing

    return "forkserver" in multiprocessing.get_all_start_methods()


def _preload_forkserver() -> None:
    """Give the forkserver voxlake's worker modules before it starts (a forkserver
    already running keeps what it has). Call with the forkserver method configured: Dask
    sets its own list on first use, so this comes after it."""
    from distributed.utils import get_mp_context

    get_mp_context().set_forkserver_preload(list(WORKER_PRELOAD))


@contextlib.contextmanager
def dask_client(config: IngestConfig, *, client: Any = None) -> Iterator[Any]:
    """Yield a ``distributed.Client``; close what this function started.

    Parameters
    ----------
    config
        ``scheduler`` (an address) wins; otherwise a ``LocalCluster`` with ``workers``
        processes of ``threads_per_worker`` threads and ``memory_limit`` each.
    client
        An existing client to use as is (not closed here).
    """
    if client is not None:
        yield client
        return
    from distributed import Client, LocalCluster

    if config.scheduler:
        try:
            # waits as long as Dask's distributed.comm.timeouts.connect says (30 s)
            remote = Client(config.scheduler)
        except OSError as exc:
            raise ConfigError(
                f"cannot reach the Dask scheduler at {config.scheduler}",
                code="scheduler_unreachable",
                hint="check the address (tcp://HOST:8786) and that the scheduler is running",
            ) from exc
        try:
            yield remote
        finally:
            remote.close()
        return
    import dask

    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **WORKER_MALLOC_ENV}
    settings: dict[str, Any] = {
        "distributed.nanny.pre-spawn-environ": environ,  # nannies read these two
        "distributed.worker.preload": [*dask.config.get("distributed.worker.preload"), _QUIET],
    }
    forked = config.workers > 1 and _forkserver_available()
    if forked:
        settings["distributed.worker.multiprocessing-method"] = "forkserver"
    with dask.config.set(settings), warnings.catch_warnings():
        # A busy dashboard port (another cluster, a notebook's): Dask serves on another one
        # and warned about it at length; the link it got is what ingest prints.
        warnings.filterwarnings("ignore", r"Port \d+ is already in use", UserWarning)
        if forked:
            _preload_forkserver()
        cluster = LocalCluster(
            n_workers=config.workers,
            threads_per_worker=config.threads_per_worker,
            memory_limit=config.memory_limit,
            processes=True,
            dashboard_address=config.dashboard_address,
            silence_logs=logging.WARNING,
        )
    local = Client(cluster)
    logger.info("local Dask cluster with %d workers: %s", config.workers, local.dashboard_link)
    try:
        yield local
    finally:
        local.close()
        cluster.close()
