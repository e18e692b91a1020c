"""Readers' warnings become codes of the file (or volume) they concern, never console text.

pydicom's own warnings are raised here by calling pydicom (not written out by hand), so a
change of its wording shows up as a code falling back to ``reader_warning``.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from pathlib import Path

import pytest

from voxlake.config import IngestConfig
from voxlake.errors import VoxlakeWarning
from voxlake.ingest.headers import read_headers
from voxlake.ingest.sources import list_source
from voxlake.ingest.warning_codes import WARNING_CODES, code_for, recorded, recording
from voxlake.testing.hostile import spec_for
from voxlake.testing.synthetic import write_series

from ..conftest import SECRET

REPO = Path(__file__).resolve().parents[2]


def _unknown_charset() -> None:
    from pydicom.charset import convert_encodings

    convert_encodings(["ISO_IR 999"])


def _undecodable() -> None:
    from pydicom.charset import convert_encodings, decode_bytes

    decode_bytes(b"\xff\xfe\xfd", convert_encodings(["ISO_IR 192"]), set())


def _invalid_is() -> None:
    from pydicom import config
    from pydicom.valuerep import IS

    IS("1e308", validation_mode=config.WARN)  # pydicom's default reading mode


def _overflow() -> None:
    import numpy as np

    np.array([60000], dtype=np.uint16).astype(np.float16) * np.float16(60000)


@pytest.mark.parametrize(
    ("raise_it", "code"),
    [
        (_unknown_charset, "charset_unknown"),
        (_undecodable, "charset_decode"),
        (_invalid_is, "invalid_value"),
    ],
)
def test_a_readers_warning_is_recorded_as_its_code_and_not_shown(raise_it, code, caplog) -> None:
    caplog.set_level("DEBUG")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        with recording() as warned:
            raise_it()
            once = recorded()
            raise_it()  # shown once per place without recording: recorded every time
            assert recorded() == len(warned.codes) == 2 * once > 0
    assert warned.since(0) == [code]
    assert warned.since(once) == [code]
    assert shown == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []  # pydicom's log


def test_numpys_warnings_have_their_code() -> None:
    """numpy's warnings are attributed to the caller's line (voxlake's, in a task)."""
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        _overflow()
    assert [code_for(str(w.message)) for w in shown] == ["numeric_warning"]


def test_an_unknown_message_is_a_reader_warning_and_every_code_is_documented() -> None:
    assert code_for("something pydicom says one day") == "reader_warning"
    text = (REPO / "docs" / "reliability.md").read_text()
    section = text.split("## Warnings are codes too", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE))
    assert documented == set(WARNING_CODES)


def test_other_threads_and_voxlakes_own_warnings_are_shown_and_state_restored() -> None:
    filters, show = list(warnings.filters), warnings.showwarning
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with recording() as warned:
            warnings.warn("for the user", VoxlakeWarning, stacklevel=1)
            other = threading.Thread(target=_unknown_charset)
            other.start()
            other.join()
            _unknown_charset()
        assert [type(w.message) for w in shown] == [VoxlakeWarning, UserWarning]
        assert "Unknown encoding" in str(shown[1].message)
    assert warned.since(0) == ["charset_unknown"]
    assert recorded() == 0
    assert warnings.filters == filters
    assert warnings.showwarning is show


def test_a_recording_within_a_recording_passes_its_codes_on() -> None:
    with recording() as outer:
        _unknown_charset()
        before = len(outer.codes)
        with recording() as inner:
            _undecodable()
        assert inner.since(0) == ["charset_decode"]
        assert outer.since(before) == ["charset_decode"]
        _undecodable()
    assert outer.since(0) == ["charset_decode", "charset_unknown"]
    assert recorded() == 0


def test_threads_recording_at_once_each_get_their_own_codes() -> None:
    start = threading.Barrier(2)
    got: dict[str, list[str]] = {}

    def run(name: str, raise_it) -> None:
        with recording() as warned:
            start.wait()
            for _ in range(50):
                raise_it()
            start.wait()
        got[name] = warned.since(0)

    threads = [
        threading.Thread(target=run, args=("a", _unknown_charset)),
        threading.Thread(target=run, args=("b", _undecodable)),
    ]
    show = warnings.showwarning
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got == {"a": ["charset_unknown"], "b": ["charset_decode"]}
    assert warnings.showwarning is show


def _series(root: Path, name: str, *, n: int = 6) -> list[Path]:
    """A series whose SeriesDescription is UTF-8 text, one file per slice."""
    spec = spec_for(name, n_slices=n, series_description="ABCDEFGH")
    written = write_series(spec, root / name)
    for path in written.files:
        data = path.read_bytes()
        path.write_bytes(data.replace(b"ISO_IR 100", b"ISO_IR 192"))
    return sorted(written.files)


def _garble(path: Path) -> None:
    """Same length, bytes that are not UTF-8, in the SeriesDescription only."""
    data = path.read_bytes()
    assert data.count(b"ABCDEFGH") == 1
    path.write_bytes(data.replace(b"ABCDEFGH", b"AB\xff\xfe\xfdFGH"))


def _read(root: Path) -> dict[str, tuple[list[str], dict]]:
    config = IngestConfig(secret=SECRET)
    batch = read_headers(list(list_source(root)), secret=SECRET, config=config, run_id="r")
    assert batch.failures == []
    for row in batch.instances:
        row.pop("ingested_at")
    return {Path(row["url"]).name: (row.pop("warnings"), row) for row in batch.instances}


def test_every_file_with_the_problem_gets_the_code_and_no_other_file(tmp_path) -> None:
    """Files read from a template, or through the remembered results of the file before,
    still get the code of a warning their own values raise; the rest stay clean."""
    files = _series(tmp_path, "one_garbled")
    _garble(files[2])
    every = _series(tmp_path, "all_garbled")
    for path in every:
        _garble(path)
    one, alone = _read(tmp_path / "one_garbled"), {}
    for path in files:  # each file in a task of its own: nothing remembered
        alone.update(_read_one(path))
    assert {name: codes for name, (codes, _) in one.items()} == {
        path.name: ["charset_decode"] if path == files[2] else [] for path in files
    }
    assert {name: row for name, (_, row) in one.items()} == {
        name: row for name, (_, row) in alone.items()
    }
    garbled = _read(tmp_path / "all_garbled")
    assert [codes for codes, _ in garbled.values()] == [["charset_decode"]] * len(every)


def _read_one(path: Path) -> dict[str, tuple[list[str], dict]]:
    config = IngestConfig(secret=SECRET)
    refs = [ref for ref in list_source(path.parent) if ref.url.endswith(path.name)]
    batch = read_headers(refs, secret=SECRET, config=config, run_id="r")
    row = batch.instances[0]
    row.pop("ingested_at")
    return {path.name: (row.pop("warnings"), row)}


@pytest.mark.integration
def test_a_volume_built_in_spite_of_a_warning_carries_its_code(tmp_path, dask_client) -> None:
    """Pixel data a few bytes longer than the frame (padding pydicom removes, with a
    warning): the volume is stored exactly and carries the code; its files do not."""
    import numpy as np
    import pydicom

    from voxlake.catalog import open_catalog
    from voxlake.ingest import ingest
    from voxlake.volumes import read_volume

    written = write_series(spec_for("padded", n_slices=4), tmp_path / "src" / "padded")
    for path in written.files:
        ds = pydicom.dcmread(path)
        ds.PixelData = ds.PixelData + b"\0" * 4
        ds.save_as(path)
    report = ingest(
        [tmp_path / "src"], catalog=str(tmp_path / "cat"), store=str(tmp_path / "v.zarr"),
        config=IngestConfig(secret=SECRET), client=dask_client,
    )  # fmt: skip
    catalog = open_catalog(str(tmp_path / "cat"))
    assert [list(w) for w in catalog.volumes.warnings] == [["excess_pixel_data"]]
    assert [list(w) for w in catalog.instances.warnings] == [[]] * len(written.files)
    assert report.warnings_by_code == {"excess_pixel_data": 1}
    row = catalog.volumes.iloc[0]
    data, _ = read_volume(row.store_url, row.store_path)
    assert np.array_equal(data, written.expected_volume())


@pytest.mark.integration
def test_a_float_image_with_nan_voxels_is_stored_as_is_and_says_so(tmp_path, dask_client) -> None:
    """NaN outside the mask of a float NIfTI: stored voxel for voxel, counted, and left
    out of the intensity figures (they were NaN, and so was z-scoring from them)."""
    import nibabel as nib
    import numpy as np

    from voxlake.catalog import open_catalog
    from voxlake.ingest import ingest
    from voxlake.volumes import read_volume

    data = np.random.default_rng(3).normal(100, 20, (12, 10, 6)).astype(np.float32)
    data[:3] = np.nan
    (tmp_path / "src").mkdir()
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "src" / "masked.nii.gz")
    report = ingest(
        [tmp_path / "src"], catalog=str(tmp_path / "cat"), store=str(tmp_path / "v.zarr"),
        config=IngestConfig(secret=SECRET), client=dask_client,
    )  # fmt: skip
    row = open_catalog(str(tmp_path / "cat")).volumes.iloc[0]
    assert list(row.warnings) == ["non_finite_values"]
    assert report.warnings_by_code == {"non_finite_values": 1}
    assert row.intensity_non_finite == int(np.isnan(data).sum())
    finite = data[np.isfinite(data)].astype(np.float64)
    assert row.intensity_mean == pytest.approx(finite.mean(), rel=1e-6)
    assert row.intensity_std == pytest.approx(finite.std(), rel=1e-6)
    stored, _ = read_volume(row.store_url, row.store_path)
    assert stored.size == data.size and int(np.isnan(stored).sum()) == row.intensity_non_finite
