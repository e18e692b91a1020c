"""Dask worker preload of voxlake's local cluster: its workers leave Ctrl-C to the driver.

A terminal's Ctrl-C signals its whole foreground process group, and a local cluster's
worker processes are in the driver's. The driver stops the run, records it as
interrupted and closes the cluster; a worker that took the signal as well died mid-task
with a ``KeyboardInterrupt`` traceback of its own (two per worker, with its nanny's),
burying the driver's message. Workers of a cluster given by address are never signalled
from the driver's terminal and do not load this.

A stopped run closes its cluster with volume tasks running, and each worker then logged a
warning per running task ("Async instruction for <Task cancelled ...> ended with
CancelledError"), which distributed's own comment says happens exclusively in
``Worker.close()``; those lines are dropped too, and nothing else that logger says.

The scheduler of a local cluster lives in the driver: when the driver stops (a second
Ctrl-C aborts its orderly close), a worker whose heartbeat finds the connection closed
logged "Failed to communicate with scheduler during heartbeat" with two chained
tracebacks, after the driver's own message. That record is dropped when the cause is the
closed connection (``CommClosedError``); a heartbeat failing for any other reason is
still logged.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

__all__ = ["dask_setup"]


def dask_setup(worker: Any) -> None:
    """Ignore SIGINT in this worker process (called by Dask as the worker starts)."""
    if threading.current_thread() is threading.main_thread():  # where signals are set
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    state_machine = logging.getLogger("distributed.worker.state_machine")
    if not any(isinstance(f, _TasksCancelledOnClose) for f in state_machine.filters):
        state_machine.addFilter(_TasksCancelledOnClose())
    worker_log = logging.getLogger("distributed.worker")
    if not any(isinstance(f, _SchedulerGone) for f in worker_log.filters):
        worker_log.addFilter(_SchedulerGone())


class _TasksCancelledOnClose(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            record.levelno == logging.WARNING
            and message.startswith("Async instruction for")
            and message.endswith("ended with CancelledError")
        )


class _SchedulerGone(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from distributed.comm.core import CommClosedError

        error = record.exc_info[1] if record.exc_info else None
        return not (
            record.getMessage().startswith("Failed to communicate with scheduler during heartbeat")
            and isinstance(error, CommClosedError)
        )
