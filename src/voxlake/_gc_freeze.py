"""Imported last by the Dask workers' forkserver (``cluster.WORKER_PRELOAD``).

Its import moves every object the preloaded modules created into the collector's permanent
generation (:func:`gc.freeze`), as Python's documentation advises before ``fork``: the
workers forked from it never scan those objects in a collection, and, since a collection
writes to the headers of the objects it scans, their pages stay shared with the
forkserver instead of being copied into each worker.
"""

import gc

gc.freeze()
