"""End-to-end training on tiny real volumes (selection given directly, no catalog)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from voxlake.errors import ConfigError
from voxlake.training import CNN3D, TrainConfig, _dist, launch, run_training
from voxlake.training._dist import check_gpus_per_rank, weights_digest
from voxlake.training._loop import resolve_output
from voxlake.training.train import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def same(a: object, b: object) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN == NaN


def config(out: Path, **changes: object) -> TrainConfig:
    base = TrainConfig(out=str(out), epochs=1, batch_size=2, shape=(16, 16, 16), lr=1e-3)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_one_epoch_writes_checkpoint_metrics_and_curves(
    ten_volumes: pd.DataFrame, tmp_path: Path
) -> None:
    report = run_training(config(tmp_path / "run", catalog_version=7), ten_volumes)
    metrics = json.loads(Path(report.metrics_path).read_text())
    assert {"history", "test", "catalog_version", "world_size", "steps_per_epoch"} <= set(metrics)
    assert metrics["catalog_version"] == 7
    assert metrics["world_size"] == 1
    assert metrics["config"]["output"] == "float32"  # "auto", resolved for the CPU
    sizes = metrics["num_samples"]
    assert sum(sizes.values()) == 10
    assert min(sizes.values()) >= 1
    assert report.steps_per_epoch == metrics["steps_per_epoch"] == math.ceil(sizes["train"] / 2)
    (row,) = metrics["history"]
    assert row["steps_per_rank"] == [report.steps_per_epoch]
    assert math.isfinite(row["train"]["loss"])
    assert math.isfinite(row["validation"]["loss"])
    assert math.isfinite(metrics["test"]["loss"])
    assert metrics["test"]["count"] == sizes["test"]
    assert Path(report.curves_path).read_bytes()[:8] == PNG_MAGIC
    checkpoint = torch.load(report.checkpoint_path, weights_only=True)
    assert checkpoint["epoch"] == 0
    assert checkpoint["catalog_version"] == 7
    model = CNN3D(1, (16, 16, 16))
    model.load_state_dict(checkpoint["model"])
    assert weights_digest(model) == report.weights_sha256[0]


def test_resume_continues_exactly_where_training_stopped(
    ten_volumes: pd.DataFrame, tmp_path: Path
) -> None:
    straight = run_training(config(tmp_path / "straight", epochs=2), ten_volumes)
    first = run_training(config(tmp_path / "resumed", epochs=1), ten_volumes)
    resumed = run_training(config(tmp_path / "resumed", epochs=2, resume=True), ten_volumes)
    assert resumed.start_epoch == 1
    assert [row["epoch"] for row in resumed.history] == [0, 1]
    assert same(resumed.history[0], first.history[0])
    # Same data order, optimizer state and random state: the same weights as no stop.
    assert same(resumed.history, straight.history)
    assert resumed.weights_sha256 == straight.weights_sha256


@pytest.mark.parametrize("mode", ["volume", "patch"])
def test_stored_output_trains_exactly_like_float32(
    ten_volumes: pd.DataFrame, tmp_path: Path, mode: str
) -> None:
    # Volumes are stored at 16^3 = shape: no resizing, as output="stored" requires.
    changes = dict(epochs=2, mode=mode, patch_size=(16, 16, 16), patches_per_volume=2)
    floats = run_training(config(tmp_path / "float32", **changes), ten_volumes)
    stored = run_training(config(tmp_path / "stored", output="stored", **changes), ten_volumes)
    assert same(stored.history, floats.history)
    assert same(stored.test, floats.test)
    assert stored.weights_sha256 == floats.weights_sha256


def test_resume_refuses_a_missing_checkpoint_or_another_catalog_version(
    ten_volumes: pd.DataFrame, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="no checkpoint"):
        run_training(config(tmp_path, resume=True), ten_volumes)
    run_training(config(tmp_path, catalog_version=1, max_steps_per_epoch=1), ten_volumes)
    with pytest.raises(ValueError, match="catalog version 1"):
        run_training(config(tmp_path, epochs=2, resume=True, catalog_version=2), ten_volumes)


def test_cli_reads_a_parquet_selection_and_limits_steps(
    ten_volumes: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ten_volumes.to_parquet(tmp_path / "selection.parquet")
    argv = ["--selection", str(tmp_path / "selection.parquet"), "--out", str(tmp_path / "run")]
    argv += ["--epochs", "1", "--shape", "16", "16", "16", "--max-steps-per-epoch", "2"]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["history"][0]["steps_per_rank"] == [2]
    assert "epoch 0: train loss" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("output", "mode", "device", "expected"),
    [
        ("auto", "patch", "cuda", "stored"),
        ("auto", "volume", "cuda", "float32"),  # volume mode usually resizes
        ("auto", "patch", "cpu", "float32"),
        ("float32", "patch", "cuda", "float32"),
        ("stored", "volume", "cpu", "stored"),
    ],
)
def test_auto_output_streams_the_stored_dtype_to_gpus_in_patch_mode(
    tmp_path: Path, output: str, mode: str, device: str, expected: str
) -> None:
    chosen = resolve_output(config(tmp_path, output=output, mode=mode), torch.device(device))
    assert chosen == expected


@pytest.mark.parametrize(
    "sizes", [{"shape": (0, 32, 32)}, {"patch_size": (8, -1, 8)}, {"shape": (16, 16)}]
)
def test_a_shape_without_three_positive_sizes_is_refused(sizes: dict) -> None:
    """`voxlake train --shape 0 32 32` raised a raw ValueError from inside the model."""
    name = next(iter(sizes))
    with pytest.raises(ConfigError, match=f"{name} must be three sizes of at least 1"):
        TrainConfig(out="unused", **sizes)


def test_more_ranks_than_gpus_is_refused_with_a_hint() -> None:
    with pytest.raises(ConfigError, match="2 ranks on this machine need one GPU each") as err:
        check_gpus_per_rank(2, 1)
    assert "CUDA_VISIBLE_DEVICES" in str(err.value.hint)
    check_gpus_per_rank(2, 2)
    check_gpus_per_rank(4, 0)  # no CUDA: the ranks run on CPU with gloo


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.integration
def test_torchrun_two_ranks_step_together_and_end_identical(
    ten_volumes: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # gloo on CPU on any machine (a GPU machine with fewer GPUs than ranks would refuse):
    # the ranks see no GPU, nor does launch's check here, where CUDA may be initialised.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(_dist, "cuda_device_count", lambda: 0)
    out = tmp_path / "ddp"
    status = launch(config(out, epochs=2, num_workers=1), nproc=2, selection=ten_volumes)
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    train_samples = metrics["num_samples"]["train"]
    expected_steps = math.ceil(math.ceil(train_samples / 2) / 2)
    for row in metrics["history"]:
        assert row["steps_per_rank"] == [expected_steps, expected_steps]
        assert math.isfinite(row["train"]["loss"])
    first, second = metrics["weights_sha256"]
    assert first == second
    assert metrics["test"]["count"] == metrics["num_samples"]["test"]
    assert (out / "checkpoint.pt").exists()


@pytest.mark.integration
def _catalog_rows(volumes: pd.DataFrame) -> tuple[list[dict], list[dict]]:
    """Catalog ``volumes`` rows and ``labels`` rows ("malignant") of a selection."""
    columns = [c for c in volumes.columns if c != "label"]
    rows = volumes[columns].assign(revision="0123abcd").to_dict("records")
    labels = [
        {"key_kind": "series", "key": key, "name": "malignant", "value": value}
        for key, value in zip(volumes.series_key, volumes.label, strict=True)
    ]
    return rows, labels


def test_training_reads_and_pins_a_real_catalog(ten_volumes: pd.DataFrame, tmp_path: Path) -> None:
    from voxlake.catalog import CatalogWriter, open_catalog

    url = str(tmp_path / "catalog")
    writer = CatalogWriter(url)
    rows, labels = _catalog_rows(ten_volumes)
    writer.commit({"volumes": rows[:8]}, run_id="r1", operation="ingest")
    pinned = writer.commit({"labels": labels}, run_id="r1", operation="attach_labels")

    out = tmp_path / "run"
    report = run_training(config(out, catalog=url, label="malignant"))
    assert report.catalog_version == pinned == open_catalog(url).version
    metrics = json.loads((out / "metrics.json").read_text())
    assert sum(metrics["num_samples"].values()) == 8  # volumes 8 and 9 are not ingested yet

    # New data arrives; a resumed run keeps reading the version it started with.
    writer.commit({"volumes": rows[8:]}, run_id="r2", operation="ingest")
    resumed = run_training(config(out, catalog=url, label="malignant", epochs=2, resume=True))
    assert resumed.catalog_version == pinned
    metrics = json.loads((out / "metrics.json").read_text())
    assert sum(metrics["num_samples"].values()) == 8
    fresh = run_training(config(tmp_path / "fresh", catalog=url, label="malignant"))
    assert fresh.catalog_version == pinned + 1


def test_command_line_round_trips_the_config_and_keeps_secrets_off_it() -> None:
    from voxlake.training._args import (
        STORAGE_OPTIONS_ENV,
        build_parser,
        config_kwargs,
        config_to_argv,
    )

    original = TrainConfig(
        out="runs/x", catalog="s3://bucket/cat", store="s3://bucket/vol", epochs=3,
        batch_size=4, shape=(8, 16, 32), lr=3e-4, seed=9, num_workers=2, label="malignant",
        fractions=(0.5, 0.25, 0.25), catalog_version=12, resume=True, max_steps_per_epoch=5,
        prefetch=1, storage_options={"key": "SECRET"}, mode="patch", patch_size=(16, 24, 32),
        patches_per_volume=3, sampler="foreground", cache_bytes=1 << 20,
        checkpoint_every_steps=7, output="stored",
    )  # fmt: skip
    argv = config_to_argv(original)
    assert not any("SECRET" in arg for arg in argv)
    env = {STORAGE_OPTIONS_ENV: json.dumps(original.storage_options)}
    assert TrainConfig(**config_kwargs(build_parser().parse_args(argv), env)) == original


@pytest.mark.integration
def test_training_uses_the_split_saved_in_the_catalog(tmp_path):
    """A saved split is used as is (not re-derived from fractions)."""
    import json

    import numpy as np

    from voxlake.catalog import CatalogWriter, open_catalog
    from voxlake.catalog.splits import save_split
    from voxlake.training.train import TrainConfig, run_training
    from voxlake.volumes import volume_path, write_volume

    rng = np.random.default_rng(0)
    writer = CatalogWriter(tmp_path / "cat")
    rows, labels = [], []
    for n in range(8):
        vid = f"{n:024x}"
        path = volume_path(vid, "ab" * 8)
        data = rng.normal(size=(16, 16, 16)).astype(np.float32)
        write_volume(tmp_path / "store", path, data, attributes={"volume_id": vid})
        rows.append(
            {
                "volume_id": vid,
                "revision": "ab" * 8,
                "patient_key": f"p{n}",
                "series_key": f"s{n}",
                "store_url": str(tmp_path / "store"),
                "store_path": path,
                "intensity_mean": 0.0,
                "intensity_std": 1.0,
            }
        )
        labels.append(
            {"key_kind": "series", "key": f"s{n}", "name": "label", "value": float(n % 2)}
        )
    writer.commit({"volumes": rows, "labels": labels}, run_id="t", operation="t")
    save_split(
        tmp_path / "cat", name="fixed", by="patient_key", fractions=(0.5, 0.25, 0.25), seed=3
    )
    saved = open_catalog(tmp_path / "cat").training_selection("label", split="fixed")
    report = run_training(
        TrainConfig(
            catalog=str(tmp_path / "cat"),
            out=str(tmp_path / "out"),
            epochs=1,
            shape=(16, 16, 16),
            split="fixed",
        )
    )
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["num_samples"]["train"] == int((saved.split == "train").sum())
    assert metrics["num_samples"]["test"] == int((saved.split == "test").sum())
    assert report.epochs >= 1


@pytest.mark.ddp
@pytest.mark.parametrize(
    ("how", "code", "said"),
    [("ctrl-c", 130, "interrupted"), ("sigterm", 143, "terminated (SIGTERM)")],
)
def test_a_stopped_voxlake_train_stops_its_ranks_quietly(
    ten_volumes: pd.DataFrame, tmp_path: Path, how: str, code: int, said: str
) -> None:
    """`voxlake train --nproc 2` stopped by Ctrl-C in its terminal (SIGINT to its process
    group) or by SIGTERM to it alone (docker stop, Kubernetes): exit 130 / 143, one line
    saying so with the --resume hint, no rank tracebacks, every rank gone (torchrun starts
    them in sessions of their own, out of reach of both signals), and the checkpoint of the
    last finished epoch stays for --resume."""
    import psutil

    from voxlake.catalog import CatalogWriter

    url = str(tmp_path / "catalog")
    rows, labels = _catalog_rows(ten_volumes)
    CatalogWriter(url).commit({"volumes": rows, "labels": labels}, run_id="r1", operation="ingest")
    out = tmp_path / "run"
    script = Path(sys.executable).with_name("voxlake")
    command = [
        str(script) if script.exists() else "voxlake", "train", "--catalog", url,
        "--label", "malignant", "--out", str(out), "--epochs", "500",
        "--shape", "16", "16", "16", "--num-workers", "0", "--nproc", "2",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU on any machine
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    started: list[psutil.Process] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("epoch 1:"):  # epoch 0's checkpoint is written
                break
        started = psutil.Process(proc.pid).children(recursive=True)  # torchrun, ranks
        assert len(started) >= 3, started
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the whole group
        else:
            proc.send_signal(signal.SIGTERM)  # as docker stop does: the main process
        _, err = proc.communicate(timeout=120)
        _, left = psutil.wait_procs(started, timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for child in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    assert proc.returncode == code, err[-3000:]
    assert not left, f"still running after voxlake train exited: {left}"
    assert err.count(said) == 1 and "--resume goes on from it" in err, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] >= 1
