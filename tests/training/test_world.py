from __future__ import annotations

import pytest

from voxlake.training import World


def test_detect_defaults_to_a_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert World.detect() == World(rank=0, world_size=1, worker_id=0, num_workers=1)


def test_detect_reads_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    world = World.detect()
    assert (world.rank, world.world_size, world.is_distributed, world.is_main) == (
        2, 3, True, False,
    )  # fmt: skip


def test_invalid_coordinates_are_refused() -> None:
    with pytest.raises(ValueError, match="rank"):
        World(rank=1, world_size=1)
    with pytest.raises(ValueError, match="worker"):
        World(worker_id=2, num_workers=2)
