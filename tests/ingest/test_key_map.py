"""The optional key map: written only where the user says, and it leads back to the IDs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from voxlake.catalog import open_catalog
from voxlake.catalog.keymap import read_key_map
from voxlake.config import IngestConfig
from voxlake.errors import ConfigError
from voxlake.ingest import ingest
from voxlake.ingest.headers import read_headers
from voxlake.ingest.sources import FileRef

from ..conftest import SECRET

pytestmark = pytest.mark.integration


def _all_bytes(*roots: str) -> bytes:
    blobs = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            blobs.extend(Path(dirpath, name).read_bytes() for name in names)
    return b"\n".join(blobs)


def test_key_map_leads_from_keys_back_to_identifiers(tmp_path, tiny_sample, dask_client):
    catalog, store = str(tmp_path / "cat"), str(tmp_path / "vol.zarr")
    key_map = str(tmp_path / "secure" / "keymap")
    config = IngestConfig(secret=SECRET, key_map_url=key_map)
    report = ingest(
        [tiny_sample.root / "dicom"], catalog=catalog, store=store, config=config,
        client=dask_client,
    )  # fmt: skip
    assert report.status == "completed" and report.failures == 0
    keys = read_key_map(key_map)
    back = {(k, key): original for k, key, original in keys[["kind", "key", "original"]].values}
    cat = open_catalog(catalog)
    assert len(cat.volumes) == len(tiny_sample.series)
    instances = cat.instances
    by_uid = {back[("series", r.series_key)]: r for r in cat.volumes.itertuples()}
    for series in tiny_sample.series:
        spec = series.spec
        row = by_uid[spec.series_instance_uid]
        assert back[("patient", row.patient_key)] == spec.patient_id
        assert back[("study", row.study_key)] == spec.study_instance_uid
        mine = instances[instances.series_key == row.series_key]
        assert {back[("accession", k)] for k in mine.accession_key} == {spec.accession_number}
        assert {back[("instance", k)] for k in mine.instance_key} == set(series.sop_instance_uids)
    # The map holds identifiers; the catalog and the store hold none of them.
    planted = [p for p in tiny_sample.planted_identifiers if len(p) >= 6]
    mapped = set(keys.original)
    assert {s.spec.patient_id for s in tiny_sample.series} <= mapped
    everything = _all_bytes(catalog, store)
    everything += b"".join(
        cat.read(t).to_json(date_format="iso").encode() for t in ("instances", "runs", "failures")
    )
    assert [p for p in planted if p.encode() in everything] == []
    assert not Path(key_map).is_relative_to(catalog)


def test_key_map_inside_the_catalog_is_refused_before_anything_is_written(
    tmp_path, tiny_sample, dask_client
):
    catalog = tmp_path / "cat"
    config = IngestConfig(secret=SECRET, key_map_url=str(catalog / "keys"))
    with pytest.raises(ConfigError):
        ingest(
            [tiny_sample.root / "dicom"], catalog=catalog, store=tmp_path / "vol.zarr",
            config=config, client=dask_client,
        )  # fmt: skip
    assert not catalog.exists()


def test_workers_return_identifiers_only_when_a_key_map_is_asked_for(tiny_sample):
    path = tiny_sample.series[0].files[0]
    ref = FileRef(str(path), path.stat().st_size, path.stat().st_mtime)
    plain = read_headers([ref], secret=SECRET, config=IngestConfig(secret=SECRET), run_id="r")
    assert len(plain.instances) == 1 and plain.key_map == []
    mapped = read_headers(
        [ref], secret=SECRET, config=IngestConfig(secret=SECRET, key_map_url="/k"), run_id="r"
    )
    kinds = {kind for kind, _, _ in mapped.key_map}
    assert {"patient", "study", "series", "instance", "accession"} <= kinds
    assert (
        "patient",
        mapped.instances[0]["patient_key"],
        tiny_sample.series[0].spec.patient_id,
    ) in (mapped.key_map)
