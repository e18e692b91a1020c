"""VolumeStream under a real gloo process group: 2 ranks, 2 DataLoader workers each."""

from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from voxlake.training import VolumeStream, partition_samples

WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(rank: int, port: int, selection_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        stream = VolumeStream(pd.read_pickle(selection_file), shape=(4, 4, 4), seed=3, batch_size=2)
        stream.set_epoch(1)
        result: dict[str, object] = {"len": len(stream)}
        # fork workers inherit the process group; spawn workers get the rank the parent
        # recorded when pickling the stream. Both must read the same samples.
        for context in ("fork", "spawn"):
            loader = DataLoader(
                stream, batch_size=2, num_workers=2, multiprocessing_context=context
            )
            result[context] = [int(i) for batch in loader for i in batch["index"]]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
def test_ranks_read_disjoint_equal_shares(seven_volumes: pd.DataFrame, tmp_path: Path) -> None:
    selection_file = tmp_path / "selection.pkl"
    seven_volumes.to_pickle(selection_file)
    mp.spawn(
        _rank_main,
        args=(free_port(), str(selection_file), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=True,
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    per_rank = [r["fork"] for r in results]
    assert [r["spawn"] for r in results] == per_rank
    assert [r["len"] for r in results] == [4, 4]
    assert [len(lst) for lst in per_rank] == [4, 4]
    counts = Counter(per_rank[0] + per_rank[1])
    assert set(counts) == set(range(7))
    # 7 samples over 2 ranks: exactly one sample is repeated, as documented padding.
    assert sum(c - 1 for c in counts.values()) == 1
    for rank, lst in enumerate(per_rank):
        expected = partition_samples(7, seed=3, epoch=1, world_size=WORLD_SIZE, rank=rank)
        assert lst == expected.tolist()
