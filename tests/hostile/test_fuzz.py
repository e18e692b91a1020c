"""Fuzzing: mutants of real scanner files and generated series, through the real stages.

Mutations (voxlake.testing.mutate) flip bits (biased to the header), truncate, delete an
element or give it a hostile value. Properties: the header stage returns exactly one
instance or coded failure row per file, never raises, never hangs; planning and building
a mutated series gives volumes or coded failures (documented codes only); one real ingest
of a batch of mutants completes with every file accounted for. ``benchmarks/fuzz.py``
runs the same checks for hours.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voxlake.catalog.tables import rows_to_table
from voxlake.config import IngestConfig
from voxlake.testing.mutate import (
    HOSTILE_VALUES,
    delete_element,
    flip_bits,
    mutate,
    replace_value,
    run_stages,
    truncate,
)

from ..conftest import SECRET, SHARED_REAL, require_shared_data
from .conftest import documented_codes

CONFIG = IngestConfig(secret=SECRET, max_file_bytes=8 * 1024 * 1024, max_voxels=50_000_000)
REAL_SEEDS = (
    *(("dcm_qa_ts", "In", f"{n}.dcm") for n in range(1, 10)),  # every transfer syntax
    ("dcm_qa_enh", "In", "Siemens", "XA10", "6_1.dcm"),  # enhanced multi-frame
    ("dcm_qa_nih", "In", "20180918GE", "mr_0005", "axial_epi_fmri_sequential_i_to_s-00024.dcm"),
)
#: Seconds one mutant may take through a stage before it counts as a hang.
SLOW = 20.0

OPERATIONS = st.one_of(
    st.tuples(
        st.just("flip"),
        st.lists(st.one_of(st.integers(0, 8 * 4096), st.integers(0, 2**31)), max_size=8),
    ),
    st.tuples(st.just("truncate"), st.integers(0, 2**31)),
    st.tuples(st.just("delete"), st.integers(0, 10**6)),
    st.tuples(st.just("replace"), st.integers(0, 10**6), st.sampled_from(HOSTILE_VALUES)),
)


@contextlib.contextmanager
def nothing_identifying_escapes():
    """Fail if a warning or log record raised meanwhile quotes a generated identifier (they
    all contain VXL): pydicom quotes raw values when it complains about them."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        root.removeHandler(handler)
    text = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    assert [t[:200] for t in text if "VXL" in t] == []


def apply(data: bytes, operation: tuple) -> bytes:
    kind, *args = operation
    if kind == "flip":
        return flip_bits(data, args[0])
    if kind == "truncate":
        return truncate(data, args[0])
    if kind == "delete":
        return delete_element(data, args[0])
    return replace_value(data, args[0], args[1])


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    """Real scanner files (every transfer syntax, enhanced multi-frame, GE EPI) and generated
    slices (explicit VR, implicit VR without preamble, RLE)."""
    from voxlake.testing.hostile import spec_for
    from voxlake.testing.synthetic import write_series

    out: dict[str, bytes] = {}
    if SHARED_REAL.exists() or os.environ.get("VOXLAKE_REQUIRE_SHARED_DATA") == "1":
        for parts in REAL_SEEDS:
            out["/".join(parts)] = require_shared_data(*parts).read_bytes()
    root = tmp_path_factory.mktemp("fuzz-seeds")
    for name, changes, preamble in (
        ("explicit", {}, True),
        ("implicit", {}, False),
        ("rle", {"transfer_syntax": "1.2.840.10008.1.2.5"}, True),
    ):
        spec = spec_for(f"fuzz-{name}", **changes)
        written = write_series(spec, root / name, preamble=preamble)
        out[f"generated/{name}"] = written.files[1].read_bytes()
    return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _header_rows(path: Path, data: bytes):
    path.write_bytes(data)
    start = time.monotonic()
    run = run_stages([path], path.parent, CONFIG, build=False)
    return run.batch, time.monotonic() - start


def _check_header_property(seeds, scratch, seed, operation) -> None:
    mutant = apply(seeds[seed], operation)
    with nothing_identifying_escapes():
        batch, elapsed = _header_rows(scratch / "mutant.dcm", mutant)
    assert elapsed < SLOW, f"{seed} {operation[0]}: {elapsed:.1f}s"
    assert len(batch.instances) + len(batch.failures) == 1
    for row in batch.failures:
        assert row["code"] in documented_codes(), (seed, operation[0], row["message"])
        assert row["stage"] == "file"
    for row in batch.instances:
        rows_to_table("instances", [row])  # the row fits the catalog schema


@pytest.mark.real_data
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), operation=OPERATIONS)
def test_any_mutant_is_one_instance_or_one_coded_failure(seeds, scratch, data, operation):
    seed = data.draw(st.sampled_from(sorted(seeds)))
    _check_header_property(seeds, scratch, seed, operation)


@pytest.mark.slow
@pytest.mark.real_data
@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), operation=OPERATIONS)
def test_any_mutant_is_one_instance_or_one_coded_failure_long(seeds, scratch, data, operation):
    seed = data.draw(st.sampled_from(sorted(seeds)))
    _check_header_property(seeds, scratch, seed, operation)


def _plan_and_build(files: list[Path], store: Path) -> tuple[int, list[str]]:
    """The stages of one ingest in process: headers, plan, build. Returns (volumes, codes);
    raises on anything a stage does not turn into a coded failure."""

    def not_hung(seconds: float) -> None:
        assert seconds < SLOW

    run = run_stages(files, store, CONFIG, on_build=not_hung)
    built = 0
    for plan, row in run.built:
        if row is not None:
            built += 1
            assert tuple(row["shape"]) == plan.shape
            assert np.isfinite(row["intensity_mean"])
    with_pixels = pd.Series([bool(r["has_pixels"]) for r in run.batch.instances])
    if with_pixels.any():
        assert built or run.codes, "an image series vanished without a failure"
    return built, run.codes


@pytest.fixture(scope="module")
def series_seed(tmp_path_factory):
    from voxlake.testing.hostile import spec_for
    from voxlake.testing.synthetic import write_series

    root = tmp_path_factory.mktemp("fuzz-series")
    return {
        "explicit": write_series(spec_for("fuzz-series"), root / "explicit"),
        "rle": write_series(
            spec_for("fuzz-series-rle", transfer_syntax="1.2.840.10008.1.2.5"), root / "rle"
        ),
    }


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    kind=st.sampled_from(["explicit", "rle"]),
    index=st.integers(0, 3),
    operation=OPERATIONS,
)
def test_a_series_with_a_mutant_slice_is_a_volume_or_coded_failures(
    series_seed, scratch, kind, index, operation
):
    written = series_seed[kind]
    folder = scratch / "series"
    folder.mkdir(exist_ok=True)
    files = []
    for k, path in enumerate(written.files):
        data = path.read_bytes()
        target = folder / path.name
        target.write_bytes(apply(data, operation) if k == index else data)
        files.append(target)
    store = scratch / f"store-{kind}"
    with nothing_identifying_escapes():
        built, codes = _plan_and_build(files, store)
    assert set(codes) <= documented_codes(), codes
    if not codes:
        assert built == 1


@pytest.mark.integration
def test_a_batch_of_mutants_ingests_in_one_run(seeds, tmp_path, dask_client):
    """60 mutants of every seed, next to a clean series, through the real pipeline."""
    from voxlake.catalog import open_catalog
    from voxlake.ingest import ingest
    from voxlake.keys import keyed_hash
    from voxlake.testing.hostile import catalog_url, spec_for
    from voxlake.testing.synthetic import write_series
    from voxlake.volumes import read_volume

    rng = np.random.default_rng(0)
    urls = []
    for index in range(60):
        name = sorted(seeds)[index % len(seeds)]
        mutant, _ = mutate(seeds[name], rng)
        path = tmp_path / "mutants" / f"{index:03d}" / "x.dcm"
        path.parent.mkdir(parents=True)
        path.write_bytes(mutant)
        urls.append(catalog_url(path))
    clean = write_series(spec_for("fuzz-clean"), tmp_path / "mutants" / "clean")
    report = ingest(
        [tmp_path / "mutants"],
        catalog=tmp_path / "cat",
        store=tmp_path / "vol.zarr",
        config=dataclasses.replace(CONFIG, batch_size=8),
        client=dask_client,
    )
    assert report.status == "completed"
    cat = open_catalog(tmp_path / "cat")
    accounted = set(cat.instances.url) | set(cat.failures.subject)
    assert [u for u in urls if u not in accounted] == []
    assert set(cat.failures.code) <= documented_codes()
    # Every volume the instances make is stored or refused with a row.
    from voxlake.ingest.series import plan_volumes

    plans, refused = plan_volumes(cat.instances, max_voxels=CONFIG.max_voxels)
    subjects = set(cat.failures.subject)
    assert [
        p.volume_id for p in plans if p.volume_id not in set(cat.volumes.volume_id) | subjects
    ] == []
    assert [f.subject for f in refused if f.subject not in subjects] == []
    row = cat.volumes.set_index("series_key").loc[
        keyed_hash(SECRET, "series", clean.spec.series_instance_uid)
    ]
    data, _ = read_volume(row.store_url, row.store_path)
    assert np.array_equal(data, clean.expected_volume())
