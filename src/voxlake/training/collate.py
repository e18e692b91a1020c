"""Batch stream samples without copying images a worker already put in shared memory."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["collate_samples"]


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate``, except that a batch of one sample is a view, not a copy.

    ``VolumeStream`` writes each image straight into shared memory inside a DataLoader
    worker; ``default_collate`` would then copy it once more into a new shared batch
    tensor (for a whole CT volume, tens of MB per sample). With one sample per batch,
    the usual case for whole volumes, each tensor is returned as ``tensor[None]``, so
    the worker sends the image it decoded. Larger batches are stacked as usual.

    Larger batches are stacked as ``default_collate`` does (into shared memory inside a
    worker), except that large tensors are copied by numpy and, in the main process,
    into memory numpy allocates (it asks for transparent huge pages, torch does not):
    ``torch.stack`` of four 96^3 float32 patches took 11 to 20 ms on a loaded 2-core
    machine, page faults and torch's OpenMP copy threads, against 1.5 ms.

    Pass it as ``DataLoader(stream, collate_fn=collate_samples, ...)``.
    """
    from torch.utils.data import default_collate

    if len(samples) != 1:
        return {key: _stack([s[key] for s in samples]) for key in samples[0]}
    out: dict[str, Any] = {}
    for key, value in samples[0].items():
        if isinstance(value, torch.Tensor):
            out[key] = value.unsqueeze(0)
        else:
            out[key] = default_collate([value])
    return out


def _stack(values: list[Any]) -> Any:
    from torch.utils.data import default_collate

    first = values[0]
    if (
        not isinstance(first, torch.Tensor)
        or first.numel() < _LARGE
        or any(
            not isinstance(v, torch.Tensor) or v.shape != first.shape or v.dtype != first.dtype
            for v in values
        )
    ):
        return default_collate(values)
    if first.dtype == torch.bfloat16 or first.requires_grad:
        return default_collate(values)
    # numpy copies: torch's copy kernels run on its OpenMP pool, whose threads measured
    # 7 to 10x slower than one plain memcpy-like loop on a loaded 2-core machine.
    from voxlake.training._output import output_tensor

    # In shared memory inside a DataLoader worker (as default_collate does), else in
    # numpy's huge-page allocation.
    out = output_tensor((len(values), *first.shape), dtype=first.numpy().dtype)
    for row, value in zip(out.numpy(), values, strict=True):
        row[...] = value.numpy()
    return out


#: Elements from which a tensor is stacked into numpy-allocated memory (256 KiB floats).
_LARGE = 1 << 16
