"""Imported last by the Dask workers' forkserver (``cluster.WORKER_PRELOAD``).

There, its import moves every object the preloaded modules created into the collector's
permanent generation (:func:`gc.freeze`), as Python's documentation advises before
``fork``: the workers forked from it never scan those objects in a collection, and, since
a collection writes to the headers of the objects it scans, their pages stay shared with
the forkserver instead of being copied into each worker.

Imported anywhere else (a tool that imports every module, say), it does nothing: frozen
objects are never collected, which only suits a process that forks workers and exits.
"""

from __future__ import annotations

import gc
import sys


def _in_forkserver() -> bool:
    """Whether this import runs inside ``multiprocessing.forkserver.main`` (its preload)."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__")
        if frame.f_code.co_name == "main" and module == "multiprocessing.forkserver":
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


if _in_forkserver():
    gc.freeze()
