"""Get a Dask client: a local cluster of worker processes by default, or an address."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from voxlake.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from voxlake.config import IngestConfig

__all__ = ["dask_client"]

logger = logging.getLogger(__name__)


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
            remote = Client(config.scheduler, timeout="20s")
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
