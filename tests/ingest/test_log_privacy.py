"""Logs (and warnings) never echo identifying values, even at DEBUG, on driver and workers."""

from __future__ import annotations

import logging
import shutil

import pytest

from voxlake.config import IngestConfig
from voxlake.ingest import ingest

from ..conftest import SECRET

pytestmark = pytest.mark.integration

_HANDLER = "voxlake-test-capture"


def _install_worker_capture() -> int:
    """Runs in each worker: capture every record at DEBUG (undone by _collect)."""
    import logging as _logging

    class Capture(_logging.Handler):
        def __init__(self) -> None:
            super().__init__(_logging.DEBUG)
            self.set_name("voxlake-test-capture")
            self.messages: list[str] = []
            self.previous_level = _logging.getLogger().level

        def emit(self, record: _logging.LogRecord) -> None:
            text = record.getMessage()
            if record.exc_info:
                text += _logging.Formatter().formatException(record.exc_info)
            self.messages.append(f"{record.name}: {text}")

    root = _logging.getLogger()
    handler = Capture()
    root.addHandler(handler)
    root.setLevel(_logging.DEBUG)
    _logging.captureWarnings(True)  # warnings (pydicom's among them) become records too
    return 1


def _collect_worker_capture() -> list[str]:
    import logging as _logging

    root = _logging.getLogger()
    messages: list[str] = []
    for handler in list(root.handlers):
        if handler.get_name() == "voxlake-test-capture":
            messages.extend(handler.messages)  # type: ignore[attr-defined]
            root.setLevel(handler.previous_level)  # type: ignore[attr-defined]
            root.removeHandler(handler)
            _logging.captureWarnings(False)
    return messages


def _probe() -> None:
    import logging as _logging

    _logging.getLogger("voxlake.test").debug("probe")


def test_debug_logs_hold_no_identifying_value(tmp_path, tiny_sample, dask_client, caplog):
    src = tmp_path / "dicom"
    shutil.copytree(tiny_sample.root / "dicom", src)
    # Exercise the failure paths too: a truncated file and a series that cannot assemble.
    victim = src / tiny_sample.series[0].files[2].relative_to(tiny_sample.root / "dicom")
    victim.write_bytes(victim.read_bytes()[:400])
    dask_client.run(_install_worker_capture)
    caplog.set_level(logging.DEBUG)
    logging.captureWarnings(True)
    try:
        report = ingest(
            [src], catalog=tmp_path / "cat", store=tmp_path / "vol.zarr",
            config=IngestConfig(secret=SECRET, key_map_url=str(tmp_path / "keys")),
            client=dask_client,
        )  # fmt: skip
        dask_client.run(_probe)  # proves the capture was live during the run
    finally:
        logging.captureWarnings(False)
        worker_logs = dask_client.run(_collect_worker_capture)
    assert report.failures >= 1  # the failure paths ran
    driver = [f"{r.name}: {r.getMessage()}" for r in caplog.records]
    workers = [m for messages in worker_logs.values() for m in messages]
    assert any(m.startswith("voxlake") for m in driver), "voxlake logged nothing at DEBUG"
    assert len(worker_logs) == 2
    assert all(any("probe" in m for m in logs) for logs in worker_logs.values())
    text = "\n".join(driver + workers)
    planted = [p for p in tiny_sample.planted_identifiers if len(p) >= 6]
    assert planted
    assert [p for p in planted if p in text] == []
