"""What the stream's reading threads produce: normalised float32 images, written where
they will be sent, and samples computed ahead in order."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

if TYPE_CHECKING:
    from voxlake.volumes.sharded import Emit

__all__ = ["normalize_array", "normalizer", "output_tensor", "prefetched"]

T = TypeVar("T")


def normalizer(
    method: str,
    *,
    mean: float = np.nan,
    std: float = np.nan,
    window: tuple[float, float] = (40.0, 400.0),
) -> Emit:
    """``emit(part, out)`` writing ``part`` z-scored, CT-windowed to [0, 1] or raw into the
    float32 view ``out``: the conversion and the arithmetic fused into two passes, with no
    intermediate array (the lean reader calls it per decoded chunk, in its threads).
    ``zscore`` needs finite ``mean`` and ``std > 0``; the caller supplies fallbacks.
    """
    if method == "zscore":
        shift, scale = np.float32(mean), np.float32(1.0 / max(float(std), 1e-6))

        def emit_zscore(part: np.ndarray, out: np.ndarray) -> None:
            np.subtract(part, shift, out=out, dtype=np.float32, casting="unsafe")
            out *= scale

        return emit_zscore
    if method == "ct_window":
        center, width = window
        low, inverse = np.float32(center - width / 2.0), np.float32(1.0 / width)

        def emit_window(part: np.ndarray, out: np.ndarray) -> None:
            np.subtract(part, low, out=out, dtype=np.float32, casting="unsafe")
            out *= inverse
            np.clip(out, 0.0, 1.0, out=out)

        return emit_window

    def emit_raw(part: np.ndarray, out: np.ndarray) -> None:
        out[...] = part

    return emit_raw


def normalize_array(
    data: np.ndarray,
    method: str,
    *,
    mean: float = np.nan,
    std: float = np.nan,
    window: tuple[float, float] = (40.0, 400.0),
) -> np.ndarray:
    """``data`` as a new float32 array, normalised by :func:`normalizer`."""
    out = np.empty(data.shape, dtype=np.float32)
    normalizer(method, mean=mean, std=std, window=window)(data, out)
    return out


def output_tensor(
    shape: tuple[int, ...], *, zero: bool = False, shared: bool = True
) -> torch.Tensor:
    """A float32 tensor for a sample's image; in shared memory inside a DataLoader worker
    when ``shared``.

    A worker's samples reach the main process through shared memory. Writing the image
    there from the start means sending it costs nothing more (with
    :func:`voxlake.training.collate_samples` and one sample per batch, not even the
    batch's stacking copy). Fresh shared pages cost more to fault in than private ones,
    so callers pass ``shared=False`` when the image will be copied anyway (batches of
    several samples, augmentation, transforms).
    """
    from torch.utils.data import get_worker_info

    if not shared or get_worker_info() is None:
        # numpy asks for transparent huge pages on large allocations, torch does not:
        # measured 3 to 7 ms against 15 to 28 ms to allocate and fill a 34 MB volume.
        return torch.from_numpy(
            np.zeros(shape, np.float32) if zero else np.empty(shape, np.float32)
        )
    count = int(np.prod(shape))
    storage: Any = torch.UntypedStorage._new_shared(count * 4)  # fresh shared pages are zeros
    strides = [int(np.prod(shape[i + 1 :])) for i in range(len(shape))]
    tensor: torch.Tensor = torch.empty(0, dtype=torch.float32).set_(storage, 0, shape, strides)
    return tensor


def prefetched(read: Callable[[int], T], items: Iterable[int], depth: int) -> Iterator[T]:
    """``read(item)`` for each item, in order, computed by ``depth`` threads ahead.

    ``depth == 0`` reads in the calling thread. Closing the generator early (break, error)
    cancels the reads nobody will consume instead of waiting for them.
    """
    if depth == 0:
        for item in items:
            yield read(item)
        return
    pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="voxlake-read")
    pending: deque[Future[T]] = deque()
    upcoming = iter(items)
    try:
        for item in upcoming:
            pending.append(pool.submit(read, item))
            if len(pending) > depth:
                break
        while pending:
            result = pending.popleft().result()
            following = next(upcoming, None)
            if following is not None:
                pending.append(pool.submit(read, following))
            yield result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
