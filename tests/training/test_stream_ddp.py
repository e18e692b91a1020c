"""VolumeStream under real gloo process groups: world size 1-4 x workers 0-3 x selections.

Cheap by design: four processes are spawned once; inside them a gloo group is formed for
each world size in turn (ranks beyond it sit out), and every (selection, worker count,
mode) combination runs in the same processes on tiny 4^3 volumes, without training. Every
batch is followed by an all-reduce, as DDP's gradient sync would be, so unequal step
counts would hang (and hit the group's timeout) instead of passing silently.
"""

from __future__ import annotations

import datetime
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from voxlake.training import VolumeStream, global_order, partition_samples

from .conftest import free_port, write_volumes

MAX_WORLD = 4
NORMAL = 11  # not a multiple of 2, 3 or 4: padding is exercised everywhere
PATCHES = 2
DEADLINE_S = 420


def sizes(world_size: int) -> list[int]:
    """Tiny selections (fewer volumes than ranks when possible) and a normal one."""
    return sorted({1, max(1, world_size - 1), NORMAL})


def configs(world_size: int) -> list[tuple[str, int, int]]:
    """(mode, selection size, workers)."""
    runs = [("volume", n, w) for n in sizes(world_size) for w in range(4)]
    return runs + [("patch", NORMAL, w) for w in range(4)]


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


def _rank_main(rank: int, ports: list[int], selection_file: str, out_dir: str) -> None:
    selection = pd.read_pickle(selection_file)
    for world_size in range(1, MAX_WORLD + 1):
        if rank >= world_size:
            continue
        if world_size > 1:  # the previous group is gone: its master port may be reused
            _wait_for(Path(out_dir, f"done-{world_size - 1}"))
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{ports[world_size - 1]}", rank=rank,
            world_size=world_size, timeout=datetime.timedelta(seconds=60),
        )  # fmt: skip
        try:
            results: dict[str, object] = {}
            for mode, n, workers in configs(world_size):
                stream = VolumeStream(
                    selection.iloc[:n], shape=(4, 4, 4), seed=3, batch_size=2, mode=mode,
                    patch_size=(3, 4, 2), patches_per_volume=PATCHES, prefetch=1,
                )  # fmt: skip
                stream.set_epoch(1)
                delivered: list[list[int]] = []
                # mp.spawn children default to spawning their own children: ask for fork.
                context = "fork" if workers else None
                loader = DataLoader(
                    stream, batch_size=2, num_workers=workers, multiprocessing_context=context
                )
                for batch in loader:
                    origins = batch.get("origin", torch.zeros(len(batch["sample"]), 3))
                    for s, o in zip(batch["sample"], origins, strict=True):
                        delivered.append([int(s), *(int(v) for v in o)])
                    dist.all_reduce(torch.ones(1))  # lockstep, like DDP's gradient sync
                results[f"{mode}-{n}-{workers}"] = {"len": len(stream), "samples": delivered}
            if world_size == 2:
                # Spawned workers do not inherit the group: they use the rank recorded
                # when the stream was pickled for them.
                stream = VolumeStream(selection, shape=(4, 4, 4), seed=3, batch_size=2)
                stream.set_epoch(1)
                loader = DataLoader(
                    stream, batch_size=2, num_workers=2, multiprocessing_context="spawn"
                )
                results["spawn"] = [int(i) for batch in loader for i in batch["sample"]]
            Path(out_dir, f"world{world_size}-rank{rank}.json").write_text(json.dumps(results))
            dist.barrier()
        finally:
            dist.destroy_process_group()
        if rank == 0:
            Path(out_dir, f"done-{world_size}").touch()


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.integration
def test_world_sizes_workers_and_selection_sizes(tmp_path: Path) -> None:
    selection = write_volumes(tmp_path / "store", NORMAL, shape=(4, 4, 4))
    selection_file = tmp_path / "selection.pkl"
    selection.to_pickle(selection_file)
    ports = [free_port() for _ in range(MAX_WORLD)]
    context = mp.spawn(
        _rank_main, args=(ports, str(selection_file), str(tmp_path)), nprocs=MAX_WORLD,
        join=False,
    )  # fmt: skip
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"DDP stream matrix did not finish within {DEADLINE_S} s (hang)")

    for world_size in range(1, MAX_WORLD + 1):
        ranks = [
            json.loads((tmp_path / f"world{world_size}-rank{r}.json").read_text())
            for r in range(world_size)
        ]
        for mode, n, _ in configs(world_size):
            total = n * (PATCHES if mode == "patch" else 1)
            per_rank = -(-total // world_size)
            by_workers = [[r[f"{mode}-{n}-{w}"] for r in ranks] for w in range(4)]
            reference = by_workers[0]
            where = f"world {world_size}, {mode} mode, {n} volumes"
            # The same samples (and patch origins), in the same order, for any worker count.
            assert all(run == reference for run in by_workers), where
            lists = [[row[0] for row in rank["samples"]] for rank in reference]
            assert [rank["len"] for rank in reference] == [per_rank] * world_size, where
            assert [len(lst) for lst in lists] == [per_rank] * world_size, where
            for rank, lst in enumerate(lists):
                expected = partition_samples(
                    total, seed=3, epoch=1, world_size=world_size, rank=rank
                )
                assert lst == expected.tolist(), where
            counts = Counter(s for lst in lists for s in lst)
            assert set(counts) == set(range(total)), where
            # Duplicates only from the documented wrap-around padding.
            assert sum(c - 1 for c in counts.values()) == per_rank * world_size - total, where
            interleaved = [
                lists[i % world_size][i // world_size] for i in range(per_rank * world_size)
            ]
            padded = np.resize(global_order(total, seed=3, epoch=1), per_rank * world_size)
            assert interleaved == padded.tolist(), where
        if world_size == 2:
            assert [r["spawn"] for r in ranks] == [
                [row[0] for row in r[f"volume-{NORMAL}-2"]["samples"]] for r in ranks
            ]
