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

    Pass it as ``DataLoader(stream, collate_fn=collate_samples, ...)``.
    """
    from torch.utils.data import default_collate

    if len(samples) != 1:
        return default_collate(list(samples))  # type: ignore[no-any-return]
    out: dict[str, Any] = {}
    for key, value in samples[0].items():
        if isinstance(value, torch.Tensor):
            out[key] = value.unsqueeze(0)
        else:
            out[key] = default_collate([value])
    return out
