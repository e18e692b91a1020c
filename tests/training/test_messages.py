"""What `voxlake train` says: unknown labels, counts printed as whole numbers, and why a
metric has no value."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from voxlake.training.train import _metrics_text, main


def test_train_on_an_unknown_label_names_the_attached_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said "the training split is empty" (add labelled volumes) instead."""
    from voxlake.catalog import CatalogWriter, attach_labels
    from voxlake.cli import main as cli
    from voxlake.keys import keyed_hash, volume_id_for

    url = str(tmp_path / "cat")
    key = keyed_hash("messages-secret", "series", "1.2.3")
    row = {"volume_id": volume_id_for(key), "revision": "r1", "series_key": key, "nbytes": 1}
    CatalogWriter(url).commit({"volumes": [row]}, run_id="a", operation="t")
    labels = pd.DataFrame({"SeriesInstanceUID": ["1.2.3"], "label": [1]})
    attach_labels(url, labels, secret="messages-secret")
    with pytest.raises(SystemExit) as exited:
        cli(["train", "--catalog", url, "--out", str(tmp_path / "run"), "--label", "nosuch"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "error [no_such_label] no label 'nosuch'" in err
    assert "hint: labels attached: label" in err and "split is empty" not in err


def test_the_test_line_prints_counts_as_whole_numbers(
    ten_volumes: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ten_volumes.to_parquet(tmp_path / "selection.parquet")
    argv = ["--selection", str(tmp_path / "selection.parquet"), "--out", str(tmp_path / "run")]
    argv += ["--epochs", "1", "--shape", "16", "16", "16", "--max-steps-per-epoch", "1"]
    assert main(argv) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("test:"))
    count = line.split("count ", 1)[1].split(",")[0].split(";")[0]
    assert count.isdigit(), line  # "count 2", not "count 2.000"
    assert "nan" not in line


def test_a_metric_without_a_value_says_why() -> None:
    """``auc nan`` on a test split of one class; every metric ``nan`` without samples."""
    nan = float("nan")
    one_class = {"loss": 0.25, "accuracy": 1.0, "auc": nan, "count": 2.0}
    assert _metrics_text(one_class) == "loss 0.250, accuracy 1.000, auc n/a (one class), count 2"
    empty = {"loss": nan, "accuracy": nan, "auc": nan, "count": 0.0}
    assert _metrics_text(empty) == (
        "loss n/a (no samples), accuracy n/a (no samples), auc n/a (no samples), count 0"
    )
