"""The local cluster voxlake starts: its workers' memory allocator settings and how
they start."""

from __future__ import annotations

import dataclasses
import os
import resource

import pytest

from voxlake.cluster import WORKER_MALLOC_ENV, WORKER_PRELOAD, dask_client
from voxlake.config import IngestConfig

from ..conftest import SECRET

pytestmark = pytest.mark.integration


def _header_faults(refs: list) -> tuple[dict[str, str | None], float, str]:
    """In a worker: its malloc settings, minor page faults per file of a header pass
    (after one warm-up pass, which imports and sizes the heap), and Arrow's allocator."""
    import pyarrow as pa

    from voxlake.ingest.headers import read_headers

    config = IngestConfig(secret=SECRET)
    read_headers(refs, secret=SECRET, config=config, run_id="warm-up")
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    batch = read_headers(refs, secret=SECRET, config=config, run_id="faults")
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
    assert len(batch.instances) == len(refs)
    pool = pa.default_memory_pool().backend_name
    return {k: os.environ.get(k) for k in WORKER_MALLOC_ENV}, faults / len(refs), pool


@pytest.mark.parametrize("workers", [1, 2])  # spawned; forked from the forkserver
def test_workers_reuse_file_buffers_instead_of_faulting_in_fresh_pages(tmp_path, workers):
    """Dask's default MALLOC_TRIM_THRESHOLD_ switches off glibc's adaptive mmap threshold,
    so every 512 KiB file read became a fresh mapping (128 page faults per file, 1.4x the
    header pass's CPU). The local cluster's workers keep reusing heap buffers, and give
    Arrow the same allocator."""
    import dask
    import distributed  # noqa: F401  (loads its configuration)

    from voxlake.ingest.sources import list_source
    from voxlake.testing import sample_specs, write_series

    base = next(s for s in sample_specs(seed=0, profile="demo") if s.rows == 512)
    write_series(dataclasses.replace(base, n_slices=24), tmp_path / "ct")
    refs = list(list_source(tmp_path / "ct"))
    assert min(r.size for r in refs) > 512 * 512 * 2  # well over glibc's 128 KiB default
    default = dask.config.get("distributed.nanny.pre-spawn-environ")
    config = IngestConfig(secret=SECRET, workers=workers, dashboard_address=":0")
    with dask_client(config) as client:
        for environ, faults, pool in client.run(_header_faults, refs).values():
            assert environ == {k: str(v) for k, v in WORKER_MALLOC_ENV.items()}
            assert faults < 16, f"{faults:.0f} minor page faults per file"  # 128 with Dask's
            # Arrow on the same heap: mimalloc kept each header task's table memory.
            assert pool == "system"
    assert dask.config.get("distributed.nanny.pre-spawn-environ") == default  # restored


def _started_with() -> tuple[int, list[str], int]:
    import gc
    import sys

    modules = [name for name in WORKER_PRELOAD if name in sys.modules]
    return os.getppid(), modules, gc.get_freeze_count()


def test_workers_start_from_a_forkserver_with_the_ingest_modules_imported():
    """Two or more local workers are forked from one forkserver that imported the ingest
    modules once, instead of each spawned worker importing them again, and froze what
    those imports made, so that the workers' collections leave it alone (and shared)."""
    import dask

    method = dask.config.get("distributed.worker.multiprocessing-method")
    with dask_client(IngestConfig(secret=SECRET, workers=2, dashboard_address=":0")) as client:
        started = list(client.run(_started_with).values())
    parents = {parent for parent, _, _ in started}
    assert len(started) == 2
    assert len(parents) == 1 and os.getpid() not in parents  # one forkserver, not this process
    assert all(modules == list(WORKER_PRELOAD) for _, modules, _ in started)
    # pydicom, zarr, pyarrow and distributed alone make tens of thousands of objects.
    assert all(frozen > 20_000 for _, _, frozen in started)
    assert dask.config.get("distributed.worker.multiprocessing-method") == method  # restored


def test_the_freeze_module_freezes_nothing_outside_the_forkserver() -> None:
    """Imported elsewhere (a tool that imports every module), it must leave the process's
    collector alone: frozen objects are never collected."""
    import subprocess
    import sys

    # Python 3.12.1 starts with objects frozen already (375 of them): count the import's own
    code = (
        "import gc; before = gc.get_freeze_count(); import voxlake._gc_freeze;"
        " print(gc.get_freeze_count() - before)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def _state_machine_says() -> tuple[list[str], bool]:
    import logging
    import signal

    class Kept(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    logger = logging.getLogger("distributed.worker.state_machine")
    kept = Kept()
    logger.addHandler(kept)
    try:
        logger.warning("Async instruction for <Task cancelled name='x'> ended with CancelledError")
        logger.warning("Async instruction for <Task name='y'> is something else")
        logger.error("an error of the state machine")
    finally:
        logger.removeHandler(kept)
    return kept.messages, signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_local_workers_leave_ctrl_c_to_the_driver_and_drop_close_noise(dask_client):
    """The local cluster's worker preload: Ctrl-C is ignored (the driver stops the run), and
    the one warning per running task that a closing worker logged ("Async instruction ...
    ended with CancelledError") is dropped, while the rest of that logger still speaks."""
    for messages, ignores_ctrl_c in dask_client.run(_state_machine_says).values():
        assert ignores_ctrl_c
        assert messages == [
            "Async instruction for <Task name='y'> is something else",
            "an error of the state machine",
        ]


def _heartbeat_failures_logged() -> list[str]:
    import logging

    from distributed.comm.core import CommClosedError

    class Kept(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            cause = type(record.exc_info[1]).__name__ if record.exc_info else ""
            self.messages.append(f"{record.getMessage()} ({cause})")

    logger = logging.getLogger("distributed.worker")
    kept = Kept()
    logger.addHandler(kept)
    try:
        for error in (CommClosedError("in <TCP (closed) heartbeat>"), OSError("no route")):
            try:
                raise error
            except OSError:  # as Worker.heartbeat logs it
                logger.exception("Failed to communicate with scheduler during heartbeat.")
    finally:
        logger.removeHandler(kept)
    return kept.messages


def test_a_heartbeat_to_a_scheduler_gone_away_is_not_logged(dask_client):
    """The local scheduler lives in the driver: stopped by a second Ctrl-C, it closes
    before its workers, and a worker's heartbeat logged its closed connection with two
    tracebacks after the driver's message. Any other heartbeat failure is still logged."""
    for messages in dask_client.run(_heartbeat_failures_logged).values():
        assert messages == ["Failed to communicate with scheduler during heartbeat. (OSError)"]


def test_a_busy_dashboard_port_is_no_warning(recwarn):
    """Dask moves the dashboard to a free port (the link reports it) and warned at length
    ("Port 8787 is already in use. Perhaps you already have a cluster running?")."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = IngestConfig(secret=SECRET, workers=1, dashboard_address=f"127.0.0.1:{port}")
        with dask_client(config) as client:
            link = client.dashboard_link
    assert f":{port}/" not in link and link.startswith("http://127.0.0.1:")
    assert [str(w.message) for w in recwarn if "already in use" in str(w.message)] == []
