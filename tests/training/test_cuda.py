"""The CUDA paths: pinned, non-blocking copies, on-device normalisation, bf16 training.

Skipped without a CUDA device (CI has none); run on a GPU machine with
``pytest -m gpu tests/training``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from tests.training.conftest import write_volumes
from voxlake.errors import ConfigError
from voxlake.training import (
    CNN3D,
    TrainConfig,
    VolumeStream,
    collate_samples,
    launch,
    normalize_on_device,
    run_training,
)
from voxlake.training._dist import weights_digest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    return write_volumes(tmp_path_factory.mktemp("cuda"), 4, shape=(20, 23, 17))


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    assert tensor.dtype == torch.float32
    return tensor.detach().cpu().contiguous().view(torch.int32)


def test_pinned_stored_batches_normalised_on_the_gpu_equal_the_float32_stream(
    volumes: pd.DataFrame,
) -> None:
    kwargs = dict(
        mode="patch", patch_size=(24, 24, 24), patches_per_volume=3, shuffle=True, batch_size=4
    )
    floats = VolumeStream(volumes, seed=5, shape=(20, 23, 17), **kwargs)  # type: ignore[arg-type]
    stored = VolumeStream(volumes, seed=5, shape=(20, 23, 17), output="stored", **kwargs)  # type: ignore[arg-type]
    reference = list(DataLoader(floats, batch_size=4, collate_fn=collate_samples))
    loader = DataLoader(
        stored, batch_size=4, num_workers=2, pin_memory=True, collate_fn=collate_samples
    )
    batches = list(loader)
    assert len(batches) == len(reference) > 0
    for expected, batch in zip(reference, batches, strict=True):
        assert batch["image"].dtype == torch.int16 and batch["image"].is_pinned()
        out = normalize_on_device(batch, "cuda")
        assert out["image"].device.type == "cuda" and out["label"].device.type == "cuda"
        # Bit patterns: the GPU kernels must give the CPU stream's float32 exactly.
        assert torch.equal(_bits(out["image"]), _bits(expected["image"]))
        assert torch.equal(out["label"].cpu(), expected["label"])


def test_unpinned_batches_are_pinned_for_the_copy_and_arrive_intact(
    volumes: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    pinned: list[tuple[int, ...]] = []
    pin_memory = torch.Tensor.pin_memory

    def recording(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        pinned.append(tuple(self.shape))
        return pin_memory(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.Tensor, "pin_memory", recording)
    stream = VolumeStream(volumes, shape=(20, 23, 17), shuffle=False)
    for sample in stream:
        image = sample["image"]
        assert not image.is_pinned()
        kept = image.clone()
        pinned.clear()
        out = normalize_on_device(sample, torch.device("cuda"))
        assert tuple(image.shape) in pinned  # staged in page-locked memory for the copy
        # The copy was queued from a pinned staging buffer, not from ``image``: changing
        # the source at once must not change what arrives.
        image.fill_(-1.0)
        torch.cuda.synchronize()
        assert torch.equal(_bits(out["image"]), _bits(kept))


def test_training_on_the_gpu_writes_a_checkpoint_a_cpu_machine_can_load(tmp_path: Path) -> None:
    selection = write_volumes(tmp_path / "store", 10, shape=(16, 16, 16))
    base = TrainConfig(out=str(tmp_path / "run"), epochs=2, batch_size=2, shape=(16, 16, 16))
    report = run_training(dataclasses.replace(base, num_workers=2), selection)
    metrics = json.loads(Path(report.metrics_path).read_text())
    assert len(metrics["history"]) == 2
    assert all(math.isfinite(row["train"]["loss"]) for row in metrics["history"])
    checkpoint = torch.load(report.checkpoint_path, map_location="cpu", weights_only=True)
    model = CNN3D(1, (16, 16, 16))
    model.load_state_dict(checkpoint["model"])  # CPU weights from a GPU run
    assert weights_digest(model) == report.weights_sha256[0]
    resumed = run_training(
        dataclasses.replace(base, num_workers=2, epochs=3, resume=True), selection
    )
    assert [row["epoch"] for row in resumed.history] == [0, 1, 2]


def test_auto_output_streams_the_stored_dtype_and_trains_exactly_like_float32(
    tmp_path: Path,
) -> None:
    selection = write_volumes(tmp_path / "store", 10, shape=(16, 16, 16))
    base = TrainConfig(
        out="", epochs=2, batch_size=2, mode="patch", patch_size=(16, 16, 16),
        patches_per_volume=2, num_workers=2,
    )  # fmt: skip
    auto = run_training(dataclasses.replace(base, out=str(tmp_path / "auto")), selection)
    floats = run_training(
        dataclasses.replace(base, out=str(tmp_path / "f32"), output="float32"), selection
    )
    metrics = json.loads(Path(auto.metrics_path).read_text())
    assert metrics["config"]["output"] == "stored"
    assert json.dumps(auto.history, sort_keys=True) == json.dumps(floats.history, sort_keys=True)


def test_more_ranks_than_gpus_is_refused_before_torchrun_starts(tmp_path: Path) -> None:
    config = TrainConfig(out=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="need one GPU each"):
        launch(config, nproc=torch.cuda.device_count() + 1)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("read_totals", [False, True])
def test_training_steps_never_wait_for_the_gpu(tmp_path: Path, read_totals: bool) -> None:
    from voxlake.training._loop import train_epoch

    selection = write_volumes(tmp_path / "store", 4, shape=(16, 16, 16))
    stream = VolumeStream(
        selection, mode="patch", patch_size=(16, 16, 16), patches_per_volume=4,
        batch_size=2, output="stored",
    )  # fmt: skip
    loader = DataLoader(stream, batch_size=2, pin_memory=True)
    model = CNN3D(1, (16, 16, 16)).cuda()
    optimizer = torch.optim.Adam(model.parameters())
    steps: list[int] = []

    def batches():  # type: ignore[no-untyped-def]
        yield from loader
        torch.cuda.set_sync_debug_mode(0)  # the epoch's end reads its totals: a sync

    def on_step(progress) -> None:  # type: ignore[no-untyped-def]
        steps.append(progress.steps)
        if read_totals:  # what a mid-epoch checkpoint does: it must wait, and is caught
            assert progress.totals[2] == 2 * progress.steps
        # From the second step on, anything that makes the host wait for the GPU raises.
        torch.cuda.set_sync_debug_mode("error")

    try:
        if read_totals:
            with pytest.raises(RuntimeError, match="synchroniz"):
                train_epoch(
                    model, batches(), optimizer, torch.device("cuda"), None, on_step=on_step
                )
        else:
            train_epoch(model, batches(), optimizer, torch.device("cuda"), None, on_step=on_step)
            assert steps == list(range(1, 9))
    finally:
        torch.cuda.set_sync_debug_mode(0)
