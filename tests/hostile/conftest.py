"""Fixtures of the hostile-input tests: the corpus, built and ingested once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from ..conftest import SECRET


@dataclass(frozen=True)
class CorpusRun:
    """The hostile corpus, the catalog and store its one ingest made, and the report."""

    corpus: object  # voxlake.testing.hostile.HostileCorpus
    catalog: str
    store: str
    report: object  # voxlake.ingest.IngestReport
    log: str


@pytest.fixture(scope="session")
def hostile_corpus(tmp_path_factory):
    from voxlake.testing.hostile import build_corpus

    return build_corpus(tmp_path_factory.mktemp("hostile") / "corpus", seed=0)


@pytest.fixture(scope="session")
def corpus_run(hostile_corpus, tmp_path_factory, dask_client):
    """Every case but the unprivileged ones, ingested in ONE run; ``log`` holds every log
    record (DEBUG and up) and warning of the driver and the workers during the run."""
    import io
    import logging

    from voxlake.config import IngestConfig
    from voxlake.ingest import ingest
    from voxlake.testing.hostile import MAX_FILE_BYTES, MAX_VOXELS

    from ..ingest.test_log_privacy import _collect_worker_capture, _install_worker_capture

    root = tmp_path_factory.mktemp("hostile-run")
    catalog, store = str(root / "catalog"), str(root / "volumes.zarr")
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setLevel(logging.DEBUG)
    logger = logging.getLogger("voxlake")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    dask_client.run(_install_worker_capture)  # every record and warning on the workers
    try:
        report = ingest(
            [hostile_corpus.archive],
            catalog=catalog,
            store=store,
            config=IngestConfig(
                secret=SECRET,
                max_file_bytes=MAX_FILE_BYTES,
                max_voxels=MAX_VOXELS,
                batch_size=16,
            ),
            client=dask_client,
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
        workers = dask_client.run(_collect_worker_capture)
    log = "\n".join([buffer.getvalue(), *(m for ms in workers.values() for m in ms)])
    return CorpusRun(hostile_corpus, catalog, store, report, log)


def documented_codes() -> set[str]:
    """Every failure code docs/reliability.md documents (the first column of its tables)."""
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "reliability.md").read_text()
    tables = text.split("## Re-running is safe", 1)[0]  # the code tables, not the case table
    return set(re.findall(r"^\| `([a-z_]+)` \|", tables, flags=re.MULTILINE))
