"""The local cluster voxlake starts: its workers' memory allocator settings."""

from __future__ import annotations

import dataclasses
import os
import resource

import pytest

from voxlake.cluster import WORKER_MALLOC_ENV, dask_client
from voxlake.config import IngestConfig

from ..conftest import SECRET

pytestmark = pytest.mark.integration


def _header_faults(refs: list) -> tuple[dict[str, str | None], float]:
    """In a worker: its malloc settings, and minor page faults per file of a header pass
    (after one warm-up pass, which imports and sizes the heap)."""
    from voxlake.ingest.headers import read_headers

    config = IngestConfig(secret=SECRET)
    read_headers(refs, secret=SECRET, config=config, run_id="warm-up")
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    batch = read_headers(refs, secret=SECRET, config=config, run_id="faults")
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
    assert len(batch.instances) == len(refs)
    return {k: os.environ.get(k) for k in WORKER_MALLOC_ENV}, faults / len(refs)


def test_workers_reuse_file_buffers_instead_of_faulting_in_fresh_pages(tmp_path):
    """Dask's default MALLOC_TRIM_THRESHOLD_ switches off glibc's adaptive mmap threshold,
    so every 512 KiB file read became a fresh mapping (128 page faults per file, 1.4x the
    header pass's CPU). The local cluster's workers keep reusing heap buffers."""
    import dask
    import distributed  # noqa: F401  (loads its configuration)

    from voxlake.ingest.sources import list_source
    from voxlake.testing import sample_specs, write_series

    base = next(s for s in sample_specs(seed=0, profile="demo") if s.rows == 512)
    write_series(dataclasses.replace(base, n_slices=24), tmp_path / "ct")
    refs = list(list_source(tmp_path / "ct"))
    assert min(r.size for r in refs) > 512 * 512 * 2  # well over glibc's 128 KiB default
    default = dask.config.get("distributed.nanny.pre-spawn-environ")
    with dask_client(IngestConfig(secret=SECRET, workers=1, dashboard_address=":0")) as client:
        environ, faults = client.submit(_header_faults, refs, pure=False).result()
    assert environ == {k: str(v) for k, v in WORKER_MALLOC_ENV.items()}
    assert faults < 16, f"{faults:.0f} minor page faults per file"  # 128 with Dask's default
    assert dask.config.get("distributed.nanny.pre-spawn-environ") == default  # restored
