"""The hostile corpus (95 cases, voxlake.testing.hostile) ingested in one run.

Every bad input becomes exactly its coded failure rows, nothing else fails, every good
series beside them is stored voxel for voxel, and a re-run adds nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from voxlake.catalog import open_catalog
from voxlake.keys import keyed_hash, volume_id_for
from voxlake.volumes import read_volume

from ..conftest import SECRET
from .conftest import documented_codes

pytestmark = pytest.mark.integration

DOCS = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


def _case_rows(case, catalog) -> tuple[pd.DataFrame, set[str]]:
    """The failure rows that belong to ``case`` and the series keys it owns."""
    failures, instances = catalog.failures, catalog.instances
    keys = {keyed_hash(SECRET, "series", uid) for uid in case.series_uids}
    keys |= set(instances[instances.url.isin(case.urls)].series_key.dropna())
    mine = (
        failures.subject.isin(case.urls)
        | failures.subject.str.split("#").str[0].isin(keys)
        | failures.subject.isin({volume_id_for(k, "") for k in keys})
    )
    return failures[mine], keys


def _mismatch(case, catalog) -> str | None:
    rows, keys = _case_rows(case, catalog)
    codes = sorted(set(rows.code))
    volumes = int(catalog.volumes.series_key.isin(keys).sum())
    instances = catalog.instances[catalog.instances.url.isin(case.urls)]
    if case.outcome == "failure":
        subjects = set(rows.subject)
        missing = [u for u in case.urls if case.stage == "file" and u not in subjects]
        stages = set(rows.stage)
        if codes != sorted(case.codes) or stages != {case.stage} or volumes or missing:
            return f"codes {codes}, stages {sorted(stages)}, volumes {volumes}, missing {missing}"
    elif case.outcome == "volume":
        if codes or volumes != 1:
            return f"codes {codes}, volumes {volumes}"
    elif codes or len(instances) != len(case.urls) or instances.has_pixels.any():
        return f"codes {codes}, instances {len(instances)}, has_pixels {list(instances.has_pixels)}"
    return None


def test_the_run_completes_and_every_case_has_its_outcome(corpus_run):
    assert corpus_run.report.status == "completed"
    catalog = open_catalog(corpus_run.catalog)
    wrong = {}
    for case in corpus_run.corpus.cases:
        if case.unprivileged:
            continue
        problem = _mismatch(case, catalog)
        if problem:
            wrong[case.name] = f"expected {case.outcome} {case.codes}: {problem}"
    assert wrong == {}


def test_the_corpus_holds_at_least_40_kinds_of_bad_input(hostile_corpus):
    bad = [c for c in hostile_corpus.cases if c.outcome != "volume"]
    names = [c.name for c in hostile_corpus.cases]
    assert len(names) == len(set(names))
    assert len(bad) >= 40
    assert len({code for c in bad for code in c.codes}) >= 25


def test_nothing_else_fails_and_each_failure_is_one_row(corpus_run):
    catalog = open_catalog(corpus_run.catalog)
    failures = catalog.failures
    assert failures.failure_id.is_unique
    claimed = set()
    for case in corpus_run.corpus.cases:
        claimed |= set(_case_rows(case, catalog)[0].failure_id)
    unexplained = failures[~failures.failure_id.isin(claimed)]
    assert unexplained[["subject", "code", "message"]].to_dict("records") == []
    assert corpus_run.report.failures == len(failures)
    assert sum(corpus_run.report.failures_by_code.values()) == len(failures)


def test_good_series_beside_bad_input_are_stored_exactly(corpus_run):
    catalog = open_catalog(corpus_run.catalog)
    volumes = catalog.volumes.set_index("series_key")
    good = [c for c in corpus_run.corpus.cases if c.outcome == "volume"]
    assert len(good) >= 10
    for case in good:
        row = volumes.loc[keyed_hash(SECRET, "series", case.series_uids[0])]
        data, attrs = read_volume(row.store_url, row.store_path)
        assert attrs["complete"]
        assert np.array_equal(data, case.written.expected_volume()), case.name
        np.testing.assert_allclose(
            np.array(row.affine).reshape(4, 4), case.written.expected_affine(), atol=1e-4
        )
    # Everything that is a volume is one of those: no bad series slipped through.
    assert len(catalog.volumes) == len(good)
    assert catalog.instances.url.is_unique


def test_objects_without_pixels_are_catalogued_not_failed(corpus_run):
    catalog = open_catalog(corpus_run.catalog)
    cases = [c for c in corpus_run.corpus.cases if c.outcome == "non_image"]
    assert {c.name for c in cases} >= {
        "structured_report",
        "presentation_state",
        "rt_structure_set",
    }
    rows = catalog.instances.set_index("url")
    for case in cases:
        row = rows.loc[case.urls[0]]
        assert not row.has_pixels and row.series_key, case.name
    assert not catalog.failures.subject.isin([c.urls[0] for c in cases]).any()


def test_every_code_produced_is_documented_and_every_case_is_in_the_docs(corpus_run):
    catalog = open_catalog(corpus_run.catalog)
    assert set(catalog.failures.code) <= documented_codes()
    text = DOCS.read_text()
    undocumented = []
    for case in corpus_run.corpus.cases:
        line = next((ln for ln in text.splitlines() if f"| `{case.name}` |" in ln), "")
        if not line or not all(f"`{code}`" in line for code in case.codes):
            undocumented.append(case.name)
    assert undocumented == []


def test_failure_messages_and_logs_hold_no_identifying_value(corpus_run):
    catalog = open_catalog(corpus_run.catalog)
    planted = [p for p in corpus_run.corpus.planted if len(p) >= 6]
    assert len(planted) > 100
    text = "\n".join([*catalog.failures.message, *catalog.failures.subject, corpus_run.log])
    assert "catalog commit" in corpus_run.log  # the capture saw the run at DEBUG
    assert [p for p in planted if p in text] == []


def test_readers_warnings_are_codes_of_their_files_not_log_lines(corpus_run):
    """The two series pydicom warns about (an unknown character set, bytes that are not
    UTF-8) carry the code in every file's row; no other file carries one; the warnings
    reach no log or console line (they would name no file, and could quote a value)."""
    catalog = open_catalog(corpus_run.catalog)
    instances, volumes = catalog.instances, catalog.volumes
    coded = {u: list(c) for u, c in zip(instances.url, instances.warnings, strict=True) if len(c)}
    expected = {
        str(path): [code]
        for name, code in (("charset_unknown", "charset_unknown"),
                           ("charset_invalid_bytes", "charset_decode"))
        for path in corpus_run.corpus.case(name).written.files
    }  # fmt: skip
    assert len(expected) >= 8
    assert coded == expected
    for text in ("Unknown encoding", "Failed to decode", "UserWarning"):
        assert text not in corpus_run.log
    counts = Counter(c for codes in [*instances.warnings, *volumes.warnings] for c in codes)
    assert corpus_run.report.warnings_by_code == dict(counts)
    run = catalog.runs.set_index("run_id").loc[corpus_run.report.run_id]
    assert json.loads(run.warnings_by_code) == dict(counts)
    files = Counter(c for codes in instances.warnings for c in codes)
    assert catalog.summary()["warnings_by_code"] == dict(files)


def test_a_rerun_over_the_corpus_adds_nothing(corpus_run, tmp_path, dask_client):
    from voxlake.config import IngestConfig
    from voxlake.ingest import ingest
    from voxlake.testing.hostile import MAX_FILE_BYTES, MAX_VOXELS

    catalog, store = tmp_path / "catalog", tmp_path / "volumes.zarr"
    shutil.copytree(corpus_run.catalog, catalog)
    shutil.copytree(corpus_run.store, store, symlinks=True)
    before = open_catalog(catalog)
    report = ingest(
        [corpus_run.corpus.archive],
        catalog=catalog,
        store=store,
        config=IngestConfig(secret=SECRET, max_file_bytes=MAX_FILE_BYTES, max_voxels=MAX_VOXELS),
        client=dask_client,
    )
    after = open_catalog(catalog)
    assert report.status == "completed"
    assert report.files_skipped == report.files_seen
    assert report.instances == 0 and report.volumes_written == 0
    for table in ("instances", "volumes", "failures"):
        assert len(after.read(table)) == len(before.read(table)), table
    assert after.failures.failure_id.is_unique


_UNPRIVILEGED = textwrap.dedent(
    """
    import sys
    from distributed import Client
    from voxlake.config import IngestConfig
    from voxlake.ingest import ingest

    if __name__ == "__main__":
        with Client(processes=False, n_workers=1, threads_per_worker=1,
                    dashboard_address=None) as client:
            report = ingest([sys.argv[1]], catalog=sys.argv[2], store=sys.argv[3],
                            config=IngestConfig(secret=sys.argv[4]), client=client)
        print(report.status)
    """
)


def test_unreadable_files_and_folders_are_coded_failures(hostile_corpus, tmp_path):
    """Root reads anything, so the permission cases run in a process without root's
    permission override (capabilities dropped with setpriv), as any other user would."""
    cases = [c for c in hostile_corpus.cases if c.unprivileged]
    assert {c.name for c in cases} == {
        "unreadable_file", "unreadable_folder", "unreadable_zip", "unreadable_tar_gz"
    }  # fmt: skip
    script = tmp_path / "unprivileged.py"
    script.write_text(_UNPRIVILEGED)
    command = [
        sys.executable,
        str(script),
        str(hostile_corpus.perm),
        str(tmp_path / "cat"),
        str(tmp_path / "vol.zarr"),
        SECRET,
    ]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot drop the override")
        drop = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "completed"
    failures = open_catalog(tmp_path / "cat").failures.set_index("subject")
    for case in cases:
        for url in case.urls:
            assert failures.loc[url, "code"] == case.codes[0], case.name
    assert json.dumps(list(failures.message)).count("VXLH") == 0


def test_header_rows_are_the_same_with_or_without_templates(hostile_corpus, monkeypatch):
    """Every hostile file (truncated, renamed, gzipped, in archives, in odd syntaxes)
    makes the same rows and failures whether the header pass reads it from a template
    or with pydicom alone."""
    from voxlake.ingest import header_template
    from voxlake.ingest.readers import native
    from voxlake.ingest.sources import FileRef, list_source

    from ..ingest.test_header_template import _assert_same_rows, _rows

    refs = [ref for ref in list_source(hostile_corpus.archive) if isinstance(ref, FileRef)]
    with_templates = _rows(refs)
    monkeypatch.setattr(header_template, "_patched", lambda *args: None)
    monkeypatch.setattr(native, "_layout_key", lambda ds: None)
    _assert_same_rows(with_templates, _rows(refs))
    assert with_templates[0] and with_templates[1]  # rows and failures were made
