"""The catalog of a real ingest: volume rows carry what volume-level queries filter on."""

from __future__ import annotations

import pytest

from voxlake.catalog import open_catalog

pytestmark = pytest.mark.integration


def test_volume_rows_carry_the_instances_slice_thickness(tiny_ingested):
    _, catalog, _, _ = tiny_ingested
    cat = open_catalog(catalog)
    volumes = cat.read("volumes", columns=["series_key", "slice_thickness"])
    instances = cat.read("instances", columns=["series_key", "slice_thickness"]).dropna(
        subset=["slice_thickness"]
    )
    assert not instances.empty
    nominal = instances.groupby("series_key")["slice_thickness"].agg(lambda s: s.mode().iloc[0])
    with_thickness = volumes[volumes["series_key"].isin(nominal.index)]
    assert not with_thickness.empty
    assert with_thickness["slice_thickness"].notna().all()
    expected = nominal.loc[with_thickness["series_key"]].to_numpy()
    assert with_thickness["slice_thickness"].to_numpy() == pytest.approx(expected)


def test_thin_slice_query_on_volumes_matches_the_instances(tiny_ingested):
    """Q1 of the benchmark asked from ``volumes`` gives what ``instances`` say."""
    _, catalog, _, _ = tiny_ingested
    cat = open_catalog(catalog)
    limit = float(cat.sql("SELECT median(slice_thickness) AS t FROM instances")["t"].iloc[0])
    by_volume = cat.sql(f"SELECT DISTINCT series_key FROM volumes WHERE slice_thickness <= {limit}")
    by_instance = cat.sql(
        "SELECT DISTINCT series_key FROM volumes WHERE series_key IN"
        f" (SELECT series_key FROM instances WHERE slice_thickness <= {limit})"
    )
    assert not by_volume.empty
    assert set(by_volume["series_key"]) == set(by_instance["series_key"])
