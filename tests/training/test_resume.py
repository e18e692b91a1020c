"""Mid-epoch checkpoints: a killed run (SIGKILL) and preempted DDP ranks resume exactly."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from voxlake.training import TrainConfig, run_training
from voxlake.training.train import main

from .conftest import free_port


def same(a: object, b: object) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN == NaN


def config(out: Path, **changes: object) -> TrainConfig:
    base = TrainConfig(
        out=str(out), epochs=2, batch_size=2, shape=(16, 16, 16), lr=1e-3,
        checkpoint_every_steps=2,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


_KILLED_CHILD = textwrap.dedent(
    """
    import dataclasses, os, signal, sys
    import pandas as pd
    import torch
    from voxlake.training import TrainConfig, run_training

    torch.set_num_threads(1)  # bit-exact comparison: same reduction order as the parent

    config = TrainConfig(**{**eval(sys.argv[2]), "shape": (16, 16, 16)})

    def on_step(epoch, step):
        if (epoch, step) == (1, 3):  # after the step-2 checkpoint, before the next one
            os.kill(os.getpid(), signal.SIGKILL)

    run_training(config, pd.read_pickle(sys.argv[1]), on_step=on_step)
    """
)


@pytest.mark.slow
@pytest.mark.integration
def test_a_killed_run_resumes_mid_epoch_exactly(
    ten_volumes: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bit-exact weights need the same float reduction order in every process: earlier
    # tests in this process may have changed torch's thread count, so pin it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        _killed_run_resumes(ten_volumes, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _killed_run_resumes(ten_volumes: pd.DataFrame, tmp_path: Path) -> None:
    straight = run_training(config(tmp_path / "straight", num_workers=1), ten_volumes)
    assert straight.steps_per_epoch == 4  # 7 training volumes, batches of 2

    out = tmp_path / "killed"
    selection_file = tmp_path / "selection.pkl"
    ten_volumes.to_pickle(selection_file)
    fields = dataclasses.asdict(config(out, num_workers=1))
    fields.pop("shape")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    result = subprocess.run(
        [sys.executable, "-c", _KILLED_CHILD, str(selection_file), repr(fields)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == -9, result.stderr  # really killed, mid-epoch
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 0
    assert checkpoint["partial"]["steps"] == 2
    assert checkpoint["stream"]["samples_yielded"] == 4 and checkpoint["stream"]["epoch"] == 1
    assert len(repr(checkpoint["stream"])) < 400

    resumed = run_training(config(out, num_workers=1, resume=True), ten_volumes)
    assert resumed.start_epoch == 1
    # Same steps, same samples in the same order, same optimizer and RNG state.
    assert same(resumed.history, straight.history)
    assert resumed.weights_sha256 == straight.weights_sha256


class Preempted(Exception):
    pass


def _ddp_rank(rank: int, port: int, selection_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        selection = pd.read_pickle(selection_file)
        straight = run_training(config(Path(out, "straight")), selection)
        assert straight.steps_per_epoch == 2

        def preempt(epoch: int, step: int) -> None:
            if (epoch, step) == (1, 1):  # right after the checkpoint of step 1 of epoch 1
                raise Preempted

        every = {"checkpoint_every_steps": 1}
        try:
            run_training(config(Path(out, "preempted"), **every), selection, on_step=preempt)
        except Preempted:
            pass  # both ranks stop at the same step; nothing collective is pending
        resumed = run_training(config(Path(out, "preempted"), resume=True, **every), selection)
        Path(out, f"rank{rank}.json").write_text(
            json.dumps(
                {
                    "straight": [straight.weights_sha256, straight.history],
                    "resumed": [resumed.weights_sha256, resumed.history, resumed.start_epoch],
                }
            )
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.integration
def test_preempted_ddp_ranks_resume_exactly(ten_volumes: pd.DataFrame, tmp_path: Path) -> None:
    selection_file = tmp_path / "selection.pkl"
    ten_volumes.to_pickle(selection_file)
    mp.spawn(_ddp_rank, args=(free_port(), str(selection_file), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        straight_digests, straight_history = result["straight"]
        digests, history, start_epoch = result["resumed"]
        assert start_epoch == 1
        assert digests == straight_digests and digests[0] == digests[1]
        assert same(history, straight_history)
        steps = history[0]["steps_per_rank"]
        assert steps[0] == steps[1] == math.ceil(math.ceil(7 / 2) / 2)


def test_patch_mode_trains_from_the_command_line(ten_volumes: pd.DataFrame, tmp_path: Path) -> None:
    ten_volumes.to_parquet(tmp_path / "selection.parquet")
    argv = ["--selection", str(tmp_path / "selection.parquet"), "--out", str(tmp_path / "run")]
    argv += ["--epochs", "1", "--mode", "patch", "--patch-size", "16", "16", "16"]
    argv += ["--patches-per-volume", "3", "--checkpoint-every-steps", "4"]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    train_volumes = metrics["num_samples"]["train"]
    assert metrics["history"][0]["steps_per_rank"] == [math.ceil(train_volumes * 3 / 2)]
    # Validation and test metrics count patches (3 per volume), each once.
    assert metrics["test"]["count"] == 3 * metrics["num_samples"]["test"]
    assert metrics["config"]["mode"] == "patch"
