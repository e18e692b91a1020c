"""The key map's location rules and its round trip (without an ingest)."""

from __future__ import annotations

import pytest

from voxlake.catalog.keymap import KeyMapWriter, check_key_map_location, read_key_map
from voxlake.errors import ConfigError


@pytest.mark.parametrize(
    "key_map",
    [
        "{root}/catalog/keys",
        "{root}/catalog",
        "{root}/volumes.zarr/keys",
        "{root}",
        "file://{root}/catalog/k",
    ],
)
def test_key_map_inside_or_around_catalog_or_store_is_refused(tmp_path, key_map):
    with pytest.raises(ConfigError) as info:
        check_key_map_location(
            key_map.format(root=tmp_path),
            catalog_url=tmp_path / "catalog",
            store_url=tmp_path / "volumes.zarr",
        )
    assert "key map" in info.value.message
    assert str(tmp_path) not in info.value.message  # the message names no location


def test_key_map_elsewhere_is_accepted_and_round_trips(tmp_path):
    check_key_map_location(
        tmp_path / "secure" / "keys", catalog_url=tmp_path / "catalog", store_url="s3://b/v"
    )
    check_key_map_location("s3://bucket/keys", catalog_url="s3://bucket/catalog")
    with pytest.raises(ConfigError):
        check_key_map_location("s3://bucket/catalog/keys/", catalog_url="s3://bucket/catalog")
    writer = KeyMapWriter(tmp_path / "secure" / "keys", catalog_url=tmp_path / "catalog")
    assert writer.write([("patient", "k1", "PAT-1"), ("patient", "k1", "PAT-1")], run_id="r") == 1
    assert writer.write([("patient", "k1", "PAT-1"), ("study", "k2", "1.2.3")], run_id="r") == 1
    again = KeyMapWriter(tmp_path / "secure" / "keys", catalog_url=tmp_path / "catalog")
    again.write([("patient", "k1", "PAT-1")], run_id="r2")  # a later run may repeat a row
    frame = read_key_map(tmp_path / "secure" / "keys")
    assert sorted(map(tuple, frame[["kind", "key", "original"]].values.tolist())) == [
        ("patient", "k1", "PAT-1"),
        ("study", "k2", "1.2.3"),
    ]
