from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from voxlake.training import VolumeStream, partition_samples, samples_per_rank
from voxlake.volumes import read_volume, volume_path, write_volume


def ids_of(loader: DataLoader) -> list[str]:
    return [vid for batch in loader for vid in batch["volume_id"]]


def test_samples_follow_the_output_contract(seven_volumes: pd.DataFrame) -> None:
    stream = VolumeStream(seven_volumes, shape=(4, 6, 5), shuffle=False, catalog_version=3)
    samples = list(stream)
    assert [s["index"] for s in samples] == list(range(7))
    assert stream.catalog_version == 3
    for sample in samples:
        row = seven_volumes.iloc[sample["index"]]
        assert sample["image"].shape == (1, 4, 6, 5)
        assert sample["image"].dtype == torch.float32
        assert sample["label"].dtype == torch.float32
        assert sample["label"].dim() == 0
        assert float(sample["label"]) == row["label"]
        assert sample["volume_id"] == row["volume_id"]


def test_zscore_uses_catalog_stats_and_falls_back_to_the_volume(
    seven_volumes: pd.DataFrame,
) -> None:
    # Same shape as stored: no resampling, so z-scored values have mean 0 and std 1.
    from_catalog = list(VolumeStream(seven_volumes, shape=(8, 8, 8), shuffle=False))
    for sample in from_catalog:
        assert abs(float(sample["image"].mean())) < 1e-4
        assert float(sample["image"].std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    no_stats = seven_volumes.assign(intensity_mean=np.nan, intensity_std=None)
    fallback = list(VolumeStream(no_stats, shape=(8, 8, 8), shuffle=False))
    for a, b in zip(from_catalog, fallback, strict=True):
        torch.testing.assert_close(a["image"], b["image"], atol=1e-4, rtol=0)


def test_raw_values_and_unlabelled_streams(seven_volumes: pd.DataFrame) -> None:
    stream = VolumeStream(
        seven_volumes.drop(columns="label"),
        shape=(8, 8, 8),
        shuffle=False,
        normalize="none",
        label_column=None,
    )
    sample = next(iter(stream))
    assert "label" not in sample
    data, _ = read_volume(seven_volumes.store_url[0], seven_volumes.store_path[0])
    assert np.array_equal(sample["image"][0].numpy(), data.astype(np.float32))


def test_4d_volumes_stream_their_first_time_point(tmp_path: Path) -> None:
    data = np.stack([np.full((4, 4, 4), 1.0), np.full((4, 4, 4), 2.0)]).astype(np.float32)
    path = volume_path("ab" * 8, "cd" * 4)
    write_volume(tmp_path, path, data, attributes={"volume_id": "ab" * 8, "spacing": [1, 1, 1]})
    selection = pd.DataFrame({"volume_id": ["ab" * 8], "store_path": [path], "label": [1.0]})
    sample = next(iter(VolumeStream(selection, tmp_path, shape=(2, 2, 2), normalize="none")))
    assert torch.equal(sample["image"], torch.ones(1, 2, 2, 2))


def test_prefetch_keeps_order_and_epochs_reshuffle(seven_volumes: pd.DataFrame) -> None:
    def order(prefetch: int, epoch: int) -> list[int]:
        stream = VolumeStream(seven_volumes, shape=(4, 4, 4), seed=1, prefetch=prefetch)
        stream.set_epoch(epoch)
        return [s["index"] for s in stream]

    expected = partition_samples(7, seed=1, epoch=2, world_size=1, rank=0).tolist()
    assert order(0, 2) == order(3, 2) == expected
    assert order(2, 3) != expected


def test_multiworker_loader_delivers_the_rank_order(seven_volumes: pd.DataFrame) -> None:
    stream = VolumeStream(seven_volumes, shape=(4, 4, 4), seed=4, batch_size=2)
    assert len(stream) == samples_per_rank(7, 1)
    indices = [int(i) for b in DataLoader(stream, batch_size=2, num_workers=2) for i in b["index"]]
    assert indices == partition_samples(7, seed=4, epoch=0, world_size=1, rank=0).tolist()


def test_pickled_stream_carries_no_open_store(seven_volumes: pd.DataFrame) -> None:
    stream = VolumeStream(seven_volumes, shape=(4, 4, 4))
    next(iter(stream))  # opens and caches the store in this process
    payload = pickle.dumps(stream)
    assert b"LocalStore" not in payload
    clone = pickle.loads(payload)
    assert [s["volume_id"] for s in clone] == [s["volume_id"] for s in stream]


def test_early_stop_does_not_hang(seven_volumes: pd.DataFrame) -> None:
    iterator = iter(VolumeStream(seven_volumes, shape=(4, 4, 4), prefetch=4))
    next(iterator)
    iterator.close()


def test_bad_selections_are_refused(seven_volumes: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="empty"):
        VolumeStream(seven_volumes.iloc[:0])
    with pytest.raises(ValueError, match="store_path"):
        VolumeStream(seven_volumes.drop(columns="store_path"))
    with pytest.raises(ValueError, match="missing"):
        VolumeStream(seven_volumes.assign(label=np.nan))
    stream = VolumeStream(seven_volumes)
    with pytest.raises(ValueError, match="same catalog version"):
        stream.load_state_dict({**stream.state_dict(), "num_samples": 8})


_RESUME_CHILD = textwrap.dedent(
    """
    import json, sys
    import pandas as pd
    from torch.utils.data import DataLoader
    from voxlake.training import VolumeStream

    selection = pd.read_pickle(sys.argv[1])
    state = json.loads(sys.argv[2])
    stream = VolumeStream(selection, shape=(4, 4, 4), seed=5, batch_size=2)
    stream.load_state_dict(state)
    stream.set_epoch(state["epoch"])
    loader = DataLoader(stream, batch_size=2, num_workers=int(sys.argv[3]))
    print(json.dumps([v for batch in loader for v in batch["volume_id"]]))
    """
)


@pytest.mark.integration
@pytest.mark.parametrize(("workers_before", "workers_after"), [(0, 0), (2, 2), (2, 0)])
def test_resume_in_a_new_process_delivers_exactly_the_rest(
    seven_volumes: pd.DataFrame, tmp_path: Path, workers_before: int, workers_after: int
) -> None:
    def make() -> VolumeStream:
        stream = VolumeStream(seven_volumes, shape=(4, 4, 4), seed=5, batch_size=2)
        stream.set_epoch(1)
        return stream

    full = ids_of(DataLoader(make(), batch_size=2, num_workers=workers_before))
    stream = make()
    seen: list[str] = []
    for batch in DataLoader(stream, batch_size=2, num_workers=workers_before):
        seen += batch["volume_id"]
        if len(seen) == 4:
            break
    assert seen == full[:4]
    state = stream.state_dict(samples_yielded=None if workers_before == 0 else len(seen))
    assert state["samples_yielded"] == 4
    assert state["epoch"] == 1

    selection_file = tmp_path / "selection.pkl"
    seven_volumes.to_pickle(selection_file)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    result = subprocess.run(
        [sys.executable, "-c", _RESUME_CHILD, str(selection_file), json.dumps(state),
         str(workers_after)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rest = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen + rest == full
