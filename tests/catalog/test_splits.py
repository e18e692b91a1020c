"""Persisted splits: hash assignment, stability as patients are added, selection."""

from __future__ import annotations

from collections import Counter

import pytest

from voxlake.catalog import CatalogWriter, open_catalog, save_split
from voxlake.catalog.splits import compute_split
from voxlake.errors import CatalogError, ConfigError
from voxlake.keys import keyed_hash, volume_id_for
from voxlake.splits import assign_split, hash_uniform

SECRET = "split-test-secret"


def volumes_for(patients: range, series_per_patient: int = 2) -> list[dict]:
    rows = []
    for p in patients:
        for s in range(series_per_patient):
            series_key = keyed_hash(SECRET, "series", f"1.2.{p}.{s}")
            rows.append(
                {
                    "volume_id": volume_id_for(series_key),
                    "revision": "r1",
                    "series_key": series_key,
                    "study_key": keyed_hash(SECRET, "study", f"1.2.{p}"),
                    "patient_key": keyed_hash(SECRET, "patient", f"PAT{p}"),
                    "modality": "CT",
                }
            )
    return rows


def saved_splits(url: str, name: str = "default") -> dict[str, str]:
    frame = open_catalog(url).splits
    frame = frame[frame["name"] == name]
    return dict(zip(frame["key"], frame["split"], strict=True))


def test_split_is_by_patient_and_saving_again_adds_nothing(tmp_path):
    url = str(tmp_path / "cat")
    writer = CatalogWriter(url)
    writer.commit({"volumes": volumes_for(range(50))}, run_id="ingest", operation="volumes")
    first = save_split(url, by="patient_key", seed=0)
    assert first.added == 50 and first.catalog_version == 2
    counts = first.counts()
    assert sum(counts.values()) == 50 and all(counts.values())
    # The saved split is exactly the shared hash assignment (no override with 50 keys).
    keys = sorted(first.assignment["key"])
    assert saved_splits(url) == dict(zip(keys, assign_split(keys, seed=0), strict=True))
    again = save_split(url, by="patient_key", seed=0)
    assert again.added == 0 and again.catalog_version == first.catalog_version
    assert open_catalog(url).version == 2
    # A name keeps its parameters.
    with pytest.raises(ConfigError, match="cannot change"):
        save_split(url, by="patient_key", seed=1)
    with pytest.raises(ConfigError):
        save_split(url, by="manufacturer")
    other = save_split(url, by="study_key", seed=3, name="by-study")
    assert other.added == 50
    assert len(open_catalog(url).splits) == 100


def test_existing_patients_keep_their_split_when_patients_are_added(tmp_path):
    url = str(tmp_path / "cat")
    writer = CatalogWriter(url)
    # Three patients: hashing alone leaves a split empty for some seed, and the shared
    # assignment then moves a key to fill it. Find such a seed.
    patients = [keyed_hash(SECRET, "patient", f"PAT{p}") for p in range(3)]
    seed = next(
        s
        for s in range(200)
        if len({("train", "validation", "test")[_bucket(k, s)] for k in patients}) < 3
    )
    writer.commit({"volumes": volumes_for(range(3))}, run_id="a", operation="volumes")
    before = save_split(url, seed=seed)
    assert set(before.assignment["split"]) == {"train", "validation", "test"}
    persisted = saved_splits(url)
    # Many more patients arrive: hashing alone would now put every key in its own bucket.
    writer.commit({"volumes": volumes_for(range(3, 300))}, run_id="b", operation="volumes")
    after = save_split(url, seed=seed)
    assert after.added == 297
    grown = saved_splits(url)
    assert len(grown) == 300
    assert {k: grown[k] for k in persisted} == persisted
    moved_by_hash = [
        k for k in patients if ("train", "validation", "test")[_bucket(k, seed)] != persisted[k]
    ]
    assert moved_by_hash, "the tiny case must have overridden at least one key"
    # New keys follow the hash (no override among 300).
    new = [k for k in grown if k not in persisted]
    assert all(grown[k] == ("train", "validation", "test")[_bucket(k, seed)] for k in new)
    shares = Counter(grown.values())
    assert 0.6 < shares["train"] / 300 < 0.8


def _bucket(key: str, seed: int) -> int:
    u = hash_uniform(key, seed)
    return 0 if u < 0.7 else 1 if u < 0.85 else 2


def test_training_selection_reads_the_saved_split(tmp_path):
    import pandas as pd

    from voxlake.catalog import attach_labels

    url = str(tmp_path / "cat")
    writer = CatalogWriter(url)
    writer.commit({"volumes": volumes_for(range(20))}, run_id="a", operation="volumes")
    labels = pd.DataFrame({"PatientID": [f"PAT{p}" for p in range(25)], "label": 1})
    attach_labels(url, labels, secret=SECRET, on="PatientID")
    cat = open_catalog(url)
    with pytest.raises(CatalogError) as info:
        cat.training_selection("label", split="default")
    assert info.value.code == "no_such_split"
    save_split(url, seed=7)
    # Patients 20-24 arrive after the split was saved.
    writer.commit({"volumes": volumes_for(range(20, 25))}, run_id="b", operation="volumes")
    cat = open_catalog(url)
    selection = cat.training_selection("label", split="default")
    assert len(selection) == 50
    assert selection.attrs == {"catalog_version": cat.version, "split": "default"}
    assert (selection.groupby("patient_key")["split"].nunique() == 1).all()
    saved = saved_splits(url)
    for key, split in zip(selection.patient_key, selection.split, strict=True):
        if key in saved:
            assert split == saved[key]
    # Unsaved keys get what saving would give them.
    preview = compute_split(cat, seed=7).set_index("key")["split"]
    assert dict(zip(selection.patient_key, selection.split, strict=True)) == preview.to_dict()
    assert "split" not in cat.training_selection("label").columns


def test_cli_split_persists_and_reports(tmp_path, capsys):
    from voxlake.cli import main

    url = str(tmp_path / "cat")
    CatalogWriter(url).commit({"volumes": volumes_for(range(30))}, run_id="a", operation="v")
    main(["catalog", "split", url, "--by", "patient_key", "--seed", "0"])
    text = capsys.readouterr().out
    assert "30 new keys" in text and "catalog version 2" in text
    assert len(saved_splits(url)) == 30


def test_cli_split_of_a_catalog_without_volumes_is_a_coded_error(tmp_path, capsys):
    import datetime as dt

    from voxlake.cli import main

    url = str(tmp_path / "cat")
    label = {"key_kind": "series", "key": "ab" * 16, "name": "label", "value": 1.0,
             "source": "", "attached_at": dt.datetime.now(dt.UTC)}  # fmt: skip
    CatalogWriter(url).commit({"labels": [label]}, run_id="a", operation="labels only")
    with pytest.raises(SystemExit) as info:
        main(["catalog", "split", url])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error [no_volumes]" in err and "no volumes to split" in err and "KeyError" not in err
    assert saved_splits(url) == {}


def test_a_changed_split_names_its_saved_fractions_as_numbers(tmp_path):
    url = str(tmp_path / "cat")
    CatalogWriter(url).commit({"volumes": volumes_for(range(5))}, run_id="a", operation="v")
    save_split(url, seed=0)
    with pytest.raises(ConfigError) as info:
        save_split(url, seed=1)
    assert "fractions=[0.7, 0.15, 0.15]" in info.value.message
    assert "np.float64" not in info.value.message
    with pytest.raises(ConfigError, match=r"got \[0\.5, 0\.5, 0\.5\]"):
        save_split(url, fractions=(0.5, 0.5, 0.5), name="other")


@pytest.mark.parametrize("name", ["", "   "])
def test_a_blank_split_name_is_refused(tmp_path, capsys, name):
    from voxlake.cli import main

    url = str(tmp_path / "cat")
    CatalogWriter(url).commit({"volumes": volumes_for(range(5))}, run_id="a", operation="v")
    with pytest.raises(ConfigError) as info:
        save_split(url, name=name)
    assert info.value.code == "bad_split_name"
    with pytest.raises(SystemExit) as exited:
        main(["catalog", "split", url, "--name", name])
    assert exited.value.code == 2
    assert "error [bad_split_name]" in capsys.readouterr().err
    assert open_catalog(url).splits.empty  # nothing saved


def test_save_split_of_a_catalog_without_volumes_is_the_coded_error(tmp_path):
    url = str(tmp_path / "cat")
    CatalogWriter(url).commit({"volumes": []}, run_id="a", operation="nothing")
    for split in (lambda: save_split(url), lambda: open_catalog(url).split()):
        with pytest.raises(CatalogError) as info:
            split()
        assert info.value.code == "no_volumes"
        assert "no volumes to split" in info.value.message and "voxlake ingest" in info.value.hint
