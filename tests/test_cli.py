"""The console script as shells, scripts and CI jobs use it: exit codes, CSV and JSON.

typer's test runner runs commands in standalone mode, where a command's ``typer.Exit(1)``
exits with 1; the installed ``voxlake`` entry point does not run in that mode, so the
exit codes are checked by running the real script in a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from voxlake.cli import app


def _voxlake() -> list[str]:
    script = Path(sys.executable).with_name("voxlake")
    return [str(script)] if script.exists() else [shutil.which("voxlake") or "voxlake"]


@pytest.mark.integration
@pytest.mark.slow
def test_verify_exits_1_when_a_reference_does_not_match(tmp_path):
    import nibabel as nib

    source, reference = tmp_path / "in", tmp_path / "ref"
    source.mkdir(), reference.mkdir()
    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), source / "a.nii.gz")
    for name, data in (("match", volume), ("mismatch", volume + 1)):
        folder = reference / name
        folder.mkdir()
        nib.save(nib.Nifti1Image(data, np.eye(4)), folder / "a.nii.gz")
    runs = {}
    for name in ("match", "mismatch"):
        command = [*_voxlake(), "verify", str(source), str(reference / name), "--workers", "1"]
        runs[name] = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert runs["match"].returncode == 0, runs["match"].stdout + runs["match"].stderr
    assert "matched 1 of 1" in runs["match"].stdout
    assert runs["mismatch"].returncode == 1, runs["mismatch"].stdout + runs["mismatch"].stderr
    assert "matched 0 of 1" in runs["mismatch"].stdout


#: Values that broke `catalog query --format csv/json` when it printed through rich:
#: brackets read as markup (one raised MarkupError), lines wrapped at 80 columns.
AWKWARD = "SELECT '[bold]x[/bold]' AS markup, '[/]' AS closing, repeat('y', 300) AS long"


def test_query_csv_and_json_are_the_values_as_they_are(tiny_ingested):
    catalog = str(tiny_ingested[1])
    query = AWKWARD + ", ['ORIGINAL', 'PRIMARY'] AS tokens"
    csv = CliRunner().invoke(app, ["catalog", "query", catalog, query, "--format", "csv"])
    assert csv.exit_code == 0, csv.output
    assert len(csv.output.splitlines()) == 2  # a header and one row: nothing wrapped
    row = pd.read_csv(io.StringIO(csv.output)).iloc[0]
    assert (row.markup, row.closing, row.long) == ("[bold]x[/bold]", "[/]", "y" * 300)
    assert json.loads(row.tokens) == ["ORIGINAL", "PRIMARY"]  # JSON, not numpy's repr

    out = CliRunner().invoke(app, ["catalog", "query", catalog, query, "--format", "json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == [
        {"markup": "[bold]x[/bold]", "closing": "[/]", "long": "y" * 300,
         "tokens": ["ORIGINAL", "PRIMARY"]}
    ]  # fmt: skip

    table = CliRunner().invoke(app, ["catalog", "query", catalog, AWKWARD])
    assert table.exit_code == 0, table.output
    assert "[bold]x[/bold]" in table.output and "[/]" in table.output


def test_an_unknown_query_format_is_a_usage_error(tiny_ingested):
    catalog = str(tiny_ingested[1])
    result = CliRunner().invoke(app, ["catalog", "query", catalog, "SELECT 1", "--format", "xml"])
    assert result.exit_code == 2 and "'xml' is not table, csv or json" in result.output


def test_a_large_csv_result_is_written_whole(tiny_ingested):
    """Every instance row with its header JSON: the same rows as the catalog's own frame."""
    catalog = str(tiny_ingested[1])
    query = "SELECT url, header_json FROM instances ORDER BY url"
    result = CliRunner().invoke(app, ["catalog", "query", catalog, query, "--format", "csv"])
    assert result.exit_code == 0, result.output
    from voxlake.catalog import open_catalog

    expected = open_catalog(catalog).sql(query)
    got = pd.read_csv(io.StringIO(result.output))
    assert len(got) == len(expected) > 50
    assert got.url.tolist() == expected.url.tolist()
    assert got.header_json.tolist() == expected.header_json.tolist()


@pytest.mark.integration
@pytest.mark.slow
def test_a_refused_volume_is_one_summary_line_not_a_worker_traceback(tmp_path, tiny_sample):
    """A series refused while its volume is built (a transfer syntax pydicom does not
    know) is a catalogued outcome: counted in the summary, with no "Compute Failed"
    traceback from the worker, which Dask logs for every task that raises."""
    source = tmp_path / "dicom"
    shutil.copytree(tiny_sample.root / "dicom", source)
    series = tiny_sample.series[0]
    bad = [source / path.relative_to(tiny_sample.root / "dicom") for path in series.files]
    for path in bad:  # same length: nothing else in the file moves
        data = path.read_bytes()
        assert b"1.2.840.10008.1.2.1\0" in data
        path.write_bytes(data.replace(b"1.2.840.10008.1.2.1\0", b"1.2.3.4.5.6.7.8.9.10"))
    command = [*_voxlake(), "ingest", str(source), "--catalog", str(tmp_path / "cat"),
               "--store", str(tmp_path / "vol.zarr"), "--workers", "2"]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300,
        env={**os.environ, "VOXLAKE_SECRET": "cli-test"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failure: unknown_transfer_syntax │ 1" in done.stdout, done.stdout
    assert "Compute Failed" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def _main(*args: str) -> int:
    """Run the console script's entry point in-process; its exit code."""
    from voxlake.cli import main

    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _volume_catalog(url: Path, *patients: str, secret: str = "cli-secret") -> str:
    """A catalog with one volume per patient (no store: enough for labels and queries)."""
    from voxlake.catalog import CatalogWriter
    from voxlake.keys import keyed_hash, volume_id_for

    rows = []
    for patient in patients:
        series = keyed_hash(secret, "series", f"{patient}.1")
        patient_key = keyed_hash(secret, "patient", patient)
        rows.append({"volume_id": volume_id_for(series), "revision": "r1", "series_key": series,
                     "patient_key": patient_key, "nbytes": 1})  # fmt: skip
    CatalogWriter(url).commit({"volumes": rows}, run_id="a", operation="t")
    return str(url)


def test_verify_refuses_missing_folders_and_no_references(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("not a reference")
    missing = str(tmp_path / "nope")
    assert _main("verify", missing, str(empty)) == 2
    assert "error [source_not_found] input folder not found" in capsys.readouterr().err
    assert _main("verify", str(empty), missing) == 2
    assert "error [source_not_found] reference folder not found" in capsys.readouterr().err
    assert _main("verify", str(empty), str(empty)) == 2
    err = capsys.readouterr().err
    assert "error [no_references]" in err and ".nii.gz" in err


def test_verify_help_describes_which_input_a_reference_uses():
    result = CliRunner().invoke(app, ["verify", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "Ref*" in text and "In" in text and "INPUT_DIR" in text
    assert "dicom2nifti" in text and "name the input" in text


@pytest.mark.integration
@pytest.mark.slow
def test_verify_names_the_in_folder_beside_a_ref_folder(tmp_path):
    import nibabel as nib

    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    (tmp_path / "qa" / "In").mkdir(parents=True)
    (tmp_path / "qa" / "Ref").mkdir()
    (tmp_path / "other").mkdir()
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "qa" / "In" / "a.nii.gz")
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "qa" / "Ref" / "a.nii.gz")
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "other" / "b.nii.gz")
    refs = tmp_path / "refs"
    shutil.copytree(tmp_path / "qa", refs / "qa")
    shutil.copy(tmp_path / "other" / "b.nii.gz", refs / "b.nii.gz")
    # qa/Ref/a.nii.gz uses qa/In; b.nii.gz uses INPUT_DIR (other).
    args = ["verify", str(tmp_path / "other"), str(refs), "--workers", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line for line in result.output.splitlines() if "voxels" in line}
    assert lines["qa/Ref/a.nii.gz:"].endswith(f"(input {refs / 'qa' / 'In'})")
    assert "(input" not in lines["b.nii.gz:"]
    assert "matched 3 of 3" in result.output  # qa/In/a.nii.gz is a reference too


def test_attach_labels_reports_matches_and_refuses_conflicts(tmp_path, capsys):
    catalog = _volume_catalog(tmp_path / "cat", "P1", "P2")
    csv = tmp_path / "labels.csv"
    csv.write_text("PatientID,label\nP1,1\nP2,0\nP9,1\nP1,1\n")
    args = ["catalog", "attach-labels", catalog, str(csv), "--on", "PatientID"]
    assert _main(*args, "--secret", "cli-secret") == 0
    captured = capsys.readouterr()
    assert "labels attached: 2 keys matched volumes, 1 matched none" in captured.out
    assert "hint" not in captured.err

    assert _main(*args, "--secret", "another-secret") == 0
    captured = capsys.readouterr()
    assert "labels attached: 0 keys matched volumes, 3 matched none" in captured.out
    assert "hint:" in captured.err and "secret" in captured.err and "--on" in captured.err

    csv.write_text("PatientID,label\nP1,1\nP2,0\nP1,0\n")
    assert _main(*args, "--secret", "cli-secret") == 2
    err = capsys.readouterr().err
    assert "error [conflicting_labels] 1 PatientID" in err and "'P1'" in err
    assert "P2" not in err


def test_attach_labels_with_a_missing_csv_is_a_coded_error(tmp_path, capsys):
    catalog = _volume_catalog(tmp_path / "cat", "P1")
    args = ["catalog", "attach-labels", catalog, str(tmp_path / "nope.csv"), "--secret", "s"]
    assert _main(*args) == 2
    err = capsys.readouterr().err
    assert "error [labels_not_found]" in err and "FileNotFoundError" not in err


@pytest.mark.parametrize("sql", ["", "   ", "/* only a comment */", "-- a comment\n;"])
def test_a_query_without_a_statement_is_a_usage_error(tmp_path, sql):
    catalog = _volume_catalog(tmp_path / "cat", "P1")
    result = CliRunner().invoke(app, ["catalog", "query", catalog, "--", sql])
    assert result.exit_code == 2, result.output
    assert "no SQL statement" in result.output


#: Cells each format wrote badly: a list (numpy repr in the table), a path (``\/`` in
#: JSON), a timestamp with microseconds (cut to milliseconds), a DATE (a timestamp), a
#: HUGEINT (a float) and a BLOB (``bytearray(b'...')`` in CSV).
ODD_CELLS = (
    "SELECT [3.0, 4.0, 4.0] AS spacing, 'a/b' AS path,"
    " TIMESTAMPTZ '2024-01-02 03:04:05.123456+00' AS at, DATE '2024-01-02' AS day,"
    " 170141183460469231731687303715884105727::HUGEINT AS big, '\\x01\\xAB'::BLOB AS raw,"
    " NULL::VARCHAR AS nothing FROM volumes"
)


def _query(catalog: str, fmt: str, capsys) -> str:
    capsys.readouterr()
    assert _main("catalog", "query", catalog, ODD_CELLS, "--format", fmt) == 0
    return capsys.readouterr().out


def test_query_json_writes_exact_values(tmp_path, capsys):
    catalog = _volume_catalog(tmp_path / "cat", "P-1")
    text = _query(catalog, "json", capsys)
    assert "\\/" not in text
    assert json.loads(text) == [
        {"spacing": [3.0, 4.0, 4.0], "path": "a/b", "at": "2024-01-02T03:04:05.123456+00:00",
         "day": "2024-01-02", "big": 170141183460469231731687303715884105727, "raw": "01ab",
         "nothing": None}
    ]  # fmt: skip


def test_query_csv_and_table_write_lists_as_json_and_blobs_as_hex(tmp_path, capsys, monkeypatch):
    from voxlake.cli._app import out

    monkeypatch.setattr(out, "_width", 250)  # every cell on one line
    catalog = _volume_catalog(tmp_path / "cat", "P-1")
    row = pd.read_csv(io.StringIO(_query(catalog, "csv", capsys)), dtype=str).iloc[0]
    assert json.loads(row.spacing) == [3.0, 4.0, 4.0]
    assert row.raw == "01ab" and row.day == "2024-01-02"
    assert row.big == "170141183460469231731687303715884105727"
    table = _query(catalog, "table", capsys)
    assert "[3.0, 4.0, 4.0]" in table and "[3. 4. 4.]" not in table
    assert "01ab" in table and "bytearray" not in table and "nan" not in table


def test_query_format_help_says_how_cells_are_written():
    result = CliRunner().invoke(app, ["catalog", "query", "--help"], env={"COLUMNS": "200"})
    assert "hexadecimal" in result.output and "ISO 8601" in result.output


def test_json_records_convert_each_kind_of_column():
    """The column-at-a-time JSON writer: missing and non-finite values are null,
    nullable integers stay integers, timestamps keep every digit and their zone, and
    list cells hold JSON values."""
    import json as jsonlib

    import numpy as np
    import pandas as pd

    from voxlake.cli._catalog import _json_records

    frame = pd.DataFrame(
        {
            "i": np.array([1, 2**62]),
            "f": [0.5, float("nan")],
            "inf": [float("inf"), -1.25],
            "n": pd.array([7, None], dtype="Int64"),
            "b": [True, False],
            "t": pd.to_datetime(["2024-01-02 03:04:05.123456789", None], utc=True),
            "l": [np.array([1.0, np.nan]), np.array([2, 3])],
            "s": ["a/b", None],
            "k": [3.0, float("nan")],
        }
    )
    frame.attrs["sql_types"] = {"k": "BIGINT"}  # a nullable BIGINT arrives as floats
    text = _json_records(frame)
    assert '"i":1,' in text and '"k":3}' in text and '"n":7,' in text  # not 1.0, 3.0, 7.0
    records = jsonlib.loads(text)
    assert records == [
        {"i": 1, "f": 0.5, "inf": None, "n": 7, "b": True,
         "t": "2024-01-02T03:04:05.123456789+00:00", "l": [1.0, None], "s": "a/b", "k": 3},
        {"i": 2**62, "f": None, "inf": -1.25, "n": None, "b": False,
         "t": None, "l": [2, 3], "s": None, "k": None},
    ]  # fmt: skip


def test_the_summary_rate_keeps_a_decimal_below_ten_files_a_second() -> None:
    """A re-run that read one changed file in 2.6 s printed "0 files/s"."""
    from voxlake.cli._ingest import _rate

    assert [_rate(v) for v in (0.0, 1 / 2.6, 9.94, 10.2, 211.7)] == ["0", "0.4", "9.9", "10", "212"]
