from __future__ import annotations

from collections import Counter

import pandas as pd
import pytest

from voxlake.training import assign_split, split_frame


def test_existing_keys_keep_their_split_when_data_grows() -> None:
    keys = [f"patient-{i}" for i in range(200)]
    before = dict(zip(keys, assign_split(keys, seed=1), strict=True))
    grown = keys + [f"patient-{i}" for i in range(200, 1000)]
    after = dict(zip(grown, assign_split(grown[::-1], seed=1)[::-1], strict=True))
    assert all(after[k] == before[k] for k in keys)
    assert assign_split(keys, seed=2) != assign_split(keys, seed=1)


def test_fractions_are_roughly_respected() -> None:
    keys = [f"k{i}" for i in range(1000)]
    counts = Counter(assign_split(keys, fractions=(0.6, 0.3, 0.1)))
    assert abs(counts["train"] - 600) < 60
    assert abs(counts["validation"] - 300) < 50
    assert abs(counts["test"] - 100) < 35


@pytest.mark.parametrize("n", [3, 4, 5, 7])
def test_tiny_datasets_get_every_split(n: int) -> None:
    for seed in range(20):
        splits = assign_split([f"p{i}" for i in range(n)], seed=seed)
        assert set(splits) == {"train", "validation", "test"}
        assert splits == assign_split([f"p{i}" for i in range(n)], seed=seed)


def test_tiny_overrides_never_touch_hashed_keys_of_large_sets() -> None:
    # With many keys hashing fills every split, so no key is overridden.
    keys = [f"k{i}" for i in range(100)]
    assert assign_split(keys[:60], seed=3) == assign_split(keys, seed=3)[:60]


def test_one_or_two_keys_still_train_and_zero_fractions_stay_empty() -> None:
    assert assign_split(["only"]) == ["train"]
    assert "train" in assign_split(["a", "b"], seed=5)
    splits = assign_split([f"p{i}" for i in range(5)], fractions=(0.8, 0.2, 0.0))
    assert "test" not in splits


def test_split_frame_keeps_patients_together() -> None:
    df = pd.DataFrame({"patient_key": [f"p{i % 30}" for i in range(90)], "x": range(90)})
    out = split_frame(df, seed=4)
    assert "split" not in df.columns
    assert len(out) == 90
    assert (out.groupby("patient_key")["split"].nunique() == 1).all()
    with pytest.raises(ValueError, match="no such column"):
        split_frame(df, by="study_key")
    with pytest.raises(ValueError, match="sum to 1"):
        assign_split(["a"], fractions=(0.5, 0.2, 0.2))
