"""Catalog benchmark: commit throughput and query latency at a million instances.

Builds a catalog of ``--rows`` instance rows (default 1,000,000) and ``--rows / 20``
volume rows (50,000) through the real commit path (``CatalogWriter.commit``: append
commits of ``--batch`` rows, as the ingest driver makes them), then times three typical
queries on a pinned ``Catalog``:

- Q1: CT volumes with slice thickness at most 1.5 mm and at least 100 slices, from the
  ``volumes`` table; Q1b: the same answered from ``instances`` (a semi-join on
  ``series_key``: 1M rows scanned), for catalogs whose volume rows lack the thickness;
- Q2: instance counts per manufacturer and model;
- Q3: all instances (12 columns, not the header) of 100 random series;
- and a single-series lookup (one ``series_key``).

Each runs through DuckDB SQL with both scan engines (``Catalog.sql(q, engine="arrow")``
over pyarrow datasets, ``Catalog.sql(q)`` with DuckDB's Parquet reader, the default for a
local catalog) and through
pandas with pushdown (``Catalog.dataset(...).to_table(filter=..., columns=...)`` then
pandas), and the same question is answered from an equivalent flat CSV with
``pandas.read_csv(usecols=...)``; ratios are CSV time / catalog time. Queries run on the
catalog as committed and again after ``voxlake catalog optimize``. Latencies are medians
of ``--repeat`` runs after one warm-up (the CSV: one run), with the CPU time of the same
runs, which a busy machine does not inflate. Every result is compared with the answer
computed from the generator's own tables (volume ids, counts per model, the
``(series_key, instance_number)`` pairs), on every path. Usage::

    python benchmarks/catalog.py                  # full size
    python benchmarks/catalog.py --rows 100000    # quicker

Figures and method are recorded in docs/performance.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from voxlake.catalog import CatalogWriter, isin, open_catalog, optimize_catalog
from voxlake.catalog.schema import SCHEMAS
from voxlake.catalog.tables import ROW_GROUP_ROWS

MANUFACTURERS = {
    "SIEMENS": ["SOMATOM Force", "SOMATOM Definition AS", "Skyra", "Prisma"],
    "GE MEDICAL SYSTEMS": ["Revolution CT", "LightSpeed VCT", "Discovery MR750", "SIGNA Premier"],
    "Philips": ["iCT 256", "Brilliance 64", "Ingenia", "Achieva"],
    "Canon Medical Systems": ["Aquilion ONE", "Aquilion Prime", "Vantage Orian"],
    "FUJIFILM": ["FCT Speedia"],
}
MODELS = [(m, model) for m, models in MANUFACTURERS.items() for model in models]
Q3_COLUMNS = [
    "url", "series_key", "instance_key", "instance_number", "image_position_patient",
    "slice_thickness", "rows", "columns", "modality", "content_hash", "transfer_syntax_uid",
    "pixel_spacing",
]  # fmt: skip


def hex_keys(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random 32-hex-digit keys (as keyed hashes look)."""
    text = rng.bytes(16 * n).hex()
    return np.array([text[i : i + 32] for i in range(0, 32 * n, 32)], dtype=object)


def make_volumes(rng: np.random.Generator, n_volumes: int, n_rows: int) -> pd.DataFrame:
    """Volume-level attributes; slice counts are skewed (most series short, a few long)."""
    counts = np.maximum(1, rng.lognormal(2.4, 1.0, n_volumes))
    counts = np.maximum(1, np.round(counts * n_rows / counts.sum())).astype(np.int64)
    counts[-1] += n_rows - counts.sum()  # exact total
    while counts[-1] < 1:  # rare: give the last volume slices back from the largest
        top = int(np.argmax(counts[:-1]))
        counts[top] -= 1 - counts[-1]
        counts[-1] = 1
    modality = rng.choice(["CT", "MR", "CR", "PT"], n_volumes, p=[0.45, 0.4, 0.1, 0.05])
    model = rng.integers(0, len(MODELS), n_volumes)
    thickness = np.where(
        modality == "CT",
        rng.choice([0.625, 1.0, 1.25, 2.5, 3.0, 5.0], n_volumes),
        rng.choice([1.0, 3.0, 4.0, 5.0], n_volumes),
    )
    patients = hex_keys(rng, max(1, n_volumes // 4))
    return pd.DataFrame(
        {
            "volume_id": [k[:24] for k in hex_keys(rng, n_volumes)],
            "series_key": hex_keys(rng, n_volumes),
            "study_key": hex_keys(rng, n_volumes),
            "patient_key": patients[rng.integers(0, len(patients), n_volumes)],
            "modality": modality,
            "manufacturer": [MODELS[i][0] for i in model],
            "manufacturer_model_name": [MODELS[i][1] for i in model],
            "slice_thickness": thickness,
            "n_slices": counts,
        }
    )


def header_json(keys: np.ndarray, numbers: np.ndarray, z: np.ndarray) -> list[str]:
    """A de-identified header in the DICOM JSON model (about 1 KB, varying per instance)."""
    return [
        '{"00080016":{"vr":"UI","Value":["1.2.840.10008.5.1.4.1.1.2"]},'
        f'"00080018":{{"vr":"UI","Value":["2.25.{int(k[:20], 16)}"]}},'
        '"00080060":{"vr":"CS","Value":["CT"]},"00180050":{"vr":"DS","Value":[1.0]},'
        '"00180060":{"vr":"DS","Value":[120]},"00181151":{"vr":"IS","Value":[250]},'
        '"00181210":{"vr":"SH","Value":["B30f"]},"00200013":{"vr":"IS","Value":['
        f"{n}]}},"
        f'"00200032":{{"vr":"DS","Value":[-175.5,-175.5,{zz:.2f}]}},'
        '"00200037":{"vr":"DS","Value":[1,0,0,0,1,0]},"00280010":{"vr":"US","Value":[512]},'
        '"00280011":{"vr":"US","Value":[512]},"00280030":{"vr":"DS","Value":[0.68,0.68]},'
        '"00280100":{"vr":"US","Value":[16]},"00281050":{"vr":"DS","Value":[40]},'
        '"00281051":{"vr":"DS","Value":[400]},"00281052":{"vr":"DS","Value":[-1024]},'
        '"00281053":{"vr":"DS","Value":[1]},"00120062":{"vr":"CS","Value":["YES"]},'
        '"00120063":{"vr":"LO","Value":["DICOM PS3.15 E.1-1 Basic Application Confidentiality'
        ' Profile","Retain Patient Characteristics Option"]}}'
        for k, n, zz in zip(keys, numbers, z, strict=True)
    ]


def instance_batch(
    volumes: pd.DataFrame, start: int, stop: int, rng: np.random.Generator
) -> pa.Table:
    """Instance rows of volumes[start:stop] with the catalog schema (all 80 columns)."""
    part = volumes.iloc[start:stop]
    repeat = part["n_slices"].to_numpy()
    n = int(repeat.sum())
    number = np.concatenate([np.arange(1, k + 1) for k in repeat])
    thickness = np.repeat(part["slice_thickness"].to_numpy(), repeat)
    z = number * thickness
    instance_keys = hex_keys(rng, n)
    series = np.repeat(part["series_key"].to_numpy(), repeat)
    columns: dict[str, Any] = {
        "url": [f"s3://archive/{s[:8]}/{i[:12]}.dcm" for s, i in zip(series, instance_keys)],
        "size": np.full(n, 526_000),
        "mtime": np.full(n, 1.7e9),
        "content_hash": hex_keys(rng, n),
        "file_format": np.full(n, "dicom", dtype=object),
        "transfer_syntax_uid": np.full(n, "1.2.840.10008.1.2.1", dtype=object),
        "has_pixels": np.ones(n, dtype=bool),
        "patient_key": np.repeat(part["patient_key"].to_numpy(), repeat),
        "study_key": np.repeat(part["study_key"].to_numpy(), repeat),
        "series_key": series,
        "instance_key": instance_keys,
        "accession_key": np.repeat(part["study_key"].to_numpy(), repeat),
        "sop_class_uid": np.full(n, "1.2.840.10008.5.1.4.1.1.2", dtype=object),
        "modality": np.repeat(part["modality"].to_numpy(), repeat),
        "manufacturer": np.repeat(part["manufacturer"].to_numpy(), repeat),
        "manufacturer_model_name": np.repeat(part["manufacturer_model_name"].to_numpy(), repeat),
        "body_part_examined": np.full(n, "CHEST", dtype=object),
        "series_description": np.full(n, "Thorax 1.0 B30f", dtype=object),
        "series_number": np.full(n, 3),
        "instance_number": number,
        "image_type": pa.array([["ORIGINAL", "PRIMARY", "AXIAL"]] * n, pa.list_(pa.string())),
        "rows": np.full(n, 512),
        "columns": np.full(n, 512),
        "pixel_spacing": pa.array([[0.68, 0.68]] * n, pa.list_(pa.float64())),
        "slice_thickness": thickness,
        "image_position_patient": pa.array(
            [[-175.5, -175.5, float(v)] for v in z], pa.list_(pa.float64())
        ),
        "image_orientation_patient": pa.array(
            [[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]] * n, pa.list_(pa.float64())
        ),
        "kvp": np.full(n, 120.0),
        "patient_age": np.full(n, "054Y", dtype=object),
        "patient_sex": rng.choice(np.array(["F", "M"], dtype=object), n),
        "header_json": header_json(instance_keys, number, z),
        "run_id": np.full(n, "bench", dtype=object),
    }
    schema = SCHEMAS["instances"]
    arrays = [
        pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(n, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def volume_table(volumes: pd.DataFrame) -> pa.Table:
    schema = SCHEMAS["volumes"]
    n = len(volumes)
    columns: dict[str, Any] = {
        name: volumes[name].to_numpy()
        for name in (
            "volume_id",
            "series_key",
            "study_key",
            "patient_key",
            "modality",
            "manufacturer",
            "manufacturer_model_name",
            "n_slices",
            "slice_thickness",
        )
    }
    columns |= {
        "revision": np.full(n, "0" * 16, dtype=object),
        "ndim": np.full(n, 3),
        "n_instances": volumes["n_slices"].to_numpy(),
        "store_url": np.full(n, "s3://store", dtype=object),
        "store_path": [f"{v}/{'0' * 16}" for v in volumes["volume_id"]],
        "dtype": np.full(n, "int16", dtype=object),
        "nbytes": volumes["n_slices"].to_numpy() * 512 * 512 * 2,
        "run_id": np.full(n, "bench", dtype=object),
    }
    arrays = [
        pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(n, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def to_csv(table: pa.Table, path: Path) -> None:
    """A flat CSV of ``table``: lists as ``a\\b`` text (DICOM multi-value style)."""
    columns = []
    for field in table.schema:
        column = table.column(field.name)
        if pa.types.is_list(field.type):
            column = pc.binary_join(pc.cast(column, pa.list_(pa.string())), "\\")
        columns.append(column)
    flat = pa.Table.from_arrays(columns, names=table.column_names)
    with pacsv.CSVWriter(path, flat.schema) as writer:
        writer.write_table(flat)


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, float, Any]:
    """(first-call seconds, median wall seconds and median CPU seconds of `repeat` later
    calls, last result). CPU time (all threads of this process) is what a busy machine
    does not inflate: on an idle one, wall time lies between CPU / cores and CPU."""
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return first, statistics.median(walls), statistics.median(cpus), result


def sql_list(values: list[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def catalog_queries(cat: Any, series: list[str], one: str) -> dict[str, dict[str, Any]]:
    thin_ct = (pc.field("modality") == "CT") & (pc.field("slice_thickness") <= 1.5)

    def q1_pandas() -> pd.DataFrame:
        vols = (
            cat.dataset("volumes")
            .to_table(
                filter=(pc.field("modality") == "CT") & (pc.field("n_slices") >= 100),
                columns=["volume_id", "series_key", "n_slices"],
            )
            .to_pandas()
        )
        thin = cat.dataset("instances").to_table(
            filter=thin_ct & isin("series_key", vols["series_key"]), columns=["series_key"]
        )
        return vols[vols["series_key"].isin(set(thin.column(0).to_pylist()))]

    thin_volumes = (
        (pc.field("modality") == "CT")
        & (pc.field("n_slices") >= 100)
        & (pc.field("slice_thickness") <= 1.5)
    )
    queries = {
        "Q1 thin CT volumes, >= 100 slices": {
            "sql": (
                "SELECT volume_id, series_key, n_slices FROM volumes"
                " WHERE modality = 'CT' AND n_slices >= 100 AND slice_thickness <= 1.5"
            ),
            "pandas": lambda: (
                cat.dataset("volumes")
                .to_table(filter=thin_volumes, columns=["volume_id", "series_key", "n_slices"])
                .to_pandas()
            ),
        },
        "Q1b the same through instances": {
            "sql": (
                "SELECT volume_id, series_key, n_slices FROM volumes"
                " WHERE modality = 'CT' AND n_slices >= 100 AND series_key IN"
                " (SELECT series_key FROM instances"
                "  WHERE modality = 'CT' AND slice_thickness <= 1.5)"
            ),
            "pandas": q1_pandas,
        },
        "Q2 instances per manufacturer and model": {
            "sql": (
                "SELECT manufacturer, manufacturer_model_name, count(*) AS n"
                " FROM instances GROUP BY 1, 2"
            ),
            "pandas": lambda: (
                cat.dataset("instances")
                .to_table(columns=["manufacturer", "manufacturer_model_name"])
                .to_pandas()
                .groupby(["manufacturer", "manufacturer_model_name"])
                .size()
            ),
        },
        "Q3 all instances of 100 random series": {
            "sql": (
                f"SELECT {', '.join(Q3_COLUMNS)} FROM instances"
                f" WHERE series_key IN ({sql_list(series)})"
            ),
            "pandas": lambda: (
                cat.dataset("instances")
                .to_table(filter=isin("series_key", series), columns=Q3_COLUMNS)
                .to_pandas()
            ),
        },
        "single-series lookup": {
            "sql": (f"SELECT {', '.join(Q3_COLUMNS)} FROM instances WHERE series_key = '{one}'"),
            "pandas": lambda: (
                cat.dataset("instances")
                .to_table(filter=pc.field("series_key") == one, columns=Q3_COLUMNS)
                .to_pandas()
            ),
        },
    }
    for paths in queries.values():
        sql = paths.pop("sql")
        paths["duckdb"] = functools.partial(cat.sql, sql, engine="arrow")
        paths["duckdb-parquet"] = functools.partial(cat.sql, sql)  # the default on local disk
    return queries


def csv_queries(root: Path, series: list[str], one: str) -> dict[str, Callable]:
    inst, vols = root / "instances.csv", root / "volumes.csv"

    def q1() -> pd.DataFrame:
        v = pd.read_csv(
            vols, usecols=["volume_id", "series_key", "modality", "n_slices", "slice_thickness"]
        )
        return v[(v.modality == "CT") & (v.n_slices >= 100) & (v.slice_thickness <= 1.5)]

    def q1b() -> pd.DataFrame:
        v = pd.read_csv(vols, usecols=["volume_id", "series_key", "modality", "n_slices"])
        v = v[(v.modality == "CT") & (v.n_slices >= 100)]
        i = pd.read_csv(inst, usecols=["series_key", "modality", "slice_thickness"])
        thin = set(i.series_key[(i.modality == "CT") & (i.slice_thickness <= 1.5)])
        return v[v.series_key.isin(thin)]

    def q2() -> pd.Series:
        i = pd.read_csv(inst, usecols=["manufacturer", "manufacturer_model_name"])
        return i.groupby(["manufacturer", "manufacturer_model_name"]).size()

    def q3() -> pd.DataFrame:
        i = pd.read_csv(inst, usecols=Q3_COLUMNS)
        return i[i.series_key.isin(set(series))]

    def q4() -> pd.DataFrame:
        i = pd.read_csv(inst, usecols=Q3_COLUMNS)
        return i[i.series_key == one]

    return {
        "Q1 thin CT volumes, >= 100 slices": q1,
        "Q1b the same through instances": q1b,
        "Q2 instances per manufacturer and model": q2,
        "Q3 all instances of 100 random series": q3,
        "single-series lookup": q4,
    }


def answer(name: str, result: Any) -> Any:
    """A query result in a form comparable across paths (checked against the generator)."""
    if name.startswith("Q1"):
        return sorted(result["volume_id"])
    if name.startswith("Q2"):
        if isinstance(result, pd.DataFrame):
            result = result.set_index(["manufacturer", "manufacturer_model_name"])["n"]
        return {key: int(n) for key, n in result.items()}
    return sorted(zip(result["series_key"], result["instance_number"], strict=True))


def expected_answers(
    volumes: pd.DataFrame, series: list[str], one: str
) -> tuple[dict[str, int], dict[str, Any]]:
    """Row counts and exact answers of every query, from the generator's volume table."""
    thin = volumes[
        (volumes.modality == "CT") & (volumes.n_slices >= 100) & (volumes.slice_thickness <= 1.5)
    ]
    per_model = volumes.groupby(["manufacturer", "manufacturer_model_name"])["n_slices"].sum()
    by_series = volumes.set_index("series_key")["n_slices"]

    def instances_of(keys: list[str]) -> list[tuple[str, int]]:
        return sorted((k, i) for k in keys for i in range(1, int(by_series[k]) + 1))

    answers = {
        "Q1 thin CT volumes, >= 100 slices": sorted(thin.volume_id),
        "Q1b the same through instances": sorted(thin.volume_id),
        "Q2 instances per manufacturer and model": {k: int(n) for k, n in per_model.items()},
        "Q3 all instances of 100 random series": instances_of(series),
        "single-series lookup": instances_of([one]),
    }
    rows = {name: len(value) for name, value in answers.items()}
    return rows, answers


def run_queries(
    url: str,
    csv: dict[str, Callable],
    series: list[str],
    one: str,
    repeat: int,
    expected: dict[str, int],
    answers: dict[str, Any],
) -> dict[str, Any]:
    t0 = time.perf_counter()
    cat = open_catalog(url)
    opened = time.perf_counter() - t0
    results: dict[str, Any] = {"open_catalog_s": opened}
    for name, paths in catalog_queries(cat, series, one).items():
        row: dict[str, Any] = {}
        for path, fn in paths.items():
            first, median, cpu, result = timed(fn, repeat)
            assert len(result) == expected[name], (name, path, len(result), expected[name])
            assert answer(name, result) == answers[name], (name, path)
            row[path] = {"first_s": first, "median_s": median, "cpu_s": cpu}
        row["rows"] = expected[name]
        row["csv_s"] = csv[name]
        results[name] = row
    cat.close()
    return results


def _ratio(value: float) -> str:
    return f"{value:.1f}x" if value < 10 else f"{value:,.0f}x"


PATHS = {"duckdb": "DuckDB (arrow)", "duckdb-parquet": "DuckDB (parquet)", "pandas": "pandas"}


def print_table(title: str, results: dict[str, Any]) -> None:
    print(f"\n{title} (open_catalog: {results['open_catalog_s'] * 1e3:.0f} ms)")
    print("wall ms median [CPU ms] (first call); ratio = CSV+pandas time / this time")
    print(f"| query | rows | {' | '.join(PATHS.values())} | CSV+pandas ms |")
    print("|---|---|" + "---|" * len(PATHS) + "---|")
    for name, row in results.items():
        if not isinstance(row, dict):
            continue
        csv = row["csv_s"]
        cells = [
            f"{r['median_s'] * 1e3:.1f} [{r['cpu_s'] * 1e3:.0f}] ({r['first_s'] * 1e3:.0f});"
            f" {_ratio(csv / r['median_s'])}"
            for r in (row[path] for path in PATHS)
        ]
        print(f"| {name} | {row['rows']:,} | {' | '.join(cells)} | {csv * 1e3:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="instance rows")
    parser.add_argument("--volumes", type=int, default=None, help="volume rows (rows / 20)")
    parser.add_argument("--batch", type=int, default=50_000, help="instance rows per commit")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per query")
    parser.add_argument("--work", type=Path, default=None, help="folder (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--row-group-rows", type=int, default=None, help="override ROW_GROUP_ROWS (experiments)"
    )
    args = parser.parse_args()
    if args.row_group_rows:
        import voxlake.catalog.tables as tables

        tables.ROW_GROUP_ROWS = args.row_group_rows
    n_volumes = args.volumes or max(1, args.rows // 20)
    work = args.work or Path(tempfile.mkdtemp(prefix="vxl-catalog-bench-"))
    shutil.rmtree(work / "catalog", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    url = str(work / "catalog")
    rng = np.random.default_rng(args.seed)
    volumes = make_volumes(rng, n_volumes, args.rows)
    print(f"{args.rows:,} instance rows, {n_volumes:,} volumes, {os.cpu_count()} CPUs, {work}")

    # -- commits: the real path, instance batches then the volume rows -------------------
    writer = CatalogWriter(url)
    bounds, acc, start = [], 0, 0
    for i, k in enumerate(volumes["n_slices"].to_numpy()):
        acc += int(k)
        if acc >= args.batch:
            bounds.append((start, i + 1))
            start, acc = i + 1, 0
    if start < n_volumes:
        bounds.append((start, n_volumes))
    build_s = commit_s = commit_cpu = 0.0
    csv_parts = []
    for b0, b1 in bounds:
        t0 = time.perf_counter()
        batch = instance_batch(volumes, b0, b1, rng)
        build_s += time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        writer.commit(
            {"instances": batch},
            run_id="bench",
            operation="headers",
            assume_new={"instances": True},
        )
        commit_s += time.perf_counter() - t0
        commit_cpu += time.process_time() - c0
        csv_parts.append(batch.drop_columns(["header_json"]))
    vtable = volume_table(volumes)
    t0 = time.perf_counter()
    writer.commit(
        {"volumes": vtable}, run_id="bench", operation="volumes", assume_new={"volumes": True}
    )
    volume_s = time.perf_counter() - t0
    total = args.rows + n_volumes
    print(f"\ncommits: {len(bounds)} instance commits of ~{args.batch:,} rows + 1 volume commit")
    print(
        f"  instances: {args.rows / commit_s:,.0f} rows/s ({commit_s:.1f} s;"
        f" CPU {commit_cpu:.1f} s: {args.rows / commit_cpu:,.0f} rows per CPU-second)"
    )
    print(f"  volumes:   {n_volumes / volume_s:,.0f} rows/s ({volume_s:.2f} s)")
    print(
        f"  overall:   {total / (commit_s + volume_s):,.0f} rows/s"
        f" (row generation, not counted: {build_s:.1f} s)"
    )
    disk = sum(p.stat().st_size for p in Path(url).rglob("*") if p.is_file())

    # -- the equivalent flat CSV (header_json left out: that only makes the CSV faster) --
    t0 = time.perf_counter()
    to_csv(pa.concat_tables(csv_parts), work / "instances.csv")
    to_csv(vtable, work / "volumes.csv")
    del csv_parts
    csv_bytes = sum((work / f).stat().st_size for f in ("instances.csv", "volumes.csv"))
    print(
        f"flat CSV written in {time.perf_counter() - t0:.1f} s ({csv_bytes / 1e6:,.0f} MB;"
        f" catalog on disk {disk / 1e6:,.0f} MB)"
    )

    pick = np.random.default_rng(args.seed + 1)
    series = [str(s) for s in pick.choice(volumes["series_key"].to_numpy(), 100, replace=False)]
    one = series[0]
    expected, answers = expected_answers(volumes, series, one)
    csv_times = {}
    for name, fn in csv_queries(work, series, one).items():
        t0 = time.perf_counter()
        result = fn()
        csv_times[name] = time.perf_counter() - t0
        assert len(result) == expected[name], (name, len(result))
        assert answer(name, result) == answers[name], name

    report: dict[str, Any] = {
        "rows": args.rows,
        "row_group_rows": args.row_group_rows or ROW_GROUP_ROWS,
        "load_average": os.getloadavg(),
        "volumes": n_volumes,
        "cpus": os.cpu_count(),
        "commit_rows_per_s": total / (commit_s + volume_s),
        "instance_rows_per_s": args.rows / commit_s,
        "instance_rows_per_cpu_s": args.rows / commit_cpu,
        "catalog_mb": disk / 1e6,
        "csv_mb": csv_bytes / 1e6,
    }
    report["as_committed"] = run_queries(
        url, csv_times, series, one, args.repeat, expected, answers
    )
    print_table("queries on the catalog as committed", report["as_committed"])
    t0 = time.perf_counter()
    optimized = optimize_catalog(url)
    report["optimize_s"] = time.perf_counter() - t0
    print(
        f"\noptimize: {report['optimize_s']:.1f} s, instances files"
        f" {optimized.files_before['instances']} -> {optimized.files_after['instances']}"
    )
    report["optimized"] = run_queries(url, csv_times, series, one, args.repeat, expected, answers)
    print_table("queries after `voxlake catalog optimize`", report["optimized"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
