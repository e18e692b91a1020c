"""What the stream's reading threads produce: normalised float32 images, written where
they will be sent, and samples computed ahead in order."""

from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

if TYPE_CHECKING:
    from voxlake.volumes.sharded import Emit

__all__ = [
    "BufferPool",
    "normalization_params",
    "normalize_array",
    "normalizer",
    "output_tensor",
    "prefetched",
]

T = TypeVar("T")


class _Scratch(threading.local):
    buffer: np.ndarray | None = None


_SCRATCH = _Scratch()  # one float32 work array per thread, grown on demand, never shared


def _scratch(shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape))
    buffer = _SCRATCH.buffer
    if buffer is None or buffer.size < count:
        buffer = _SCRATCH.buffer = np.empty(count, np.float32)
    return buffer[:count].reshape(shape)


def normalization_params(
    method: str,
    *,
    mean: float = np.nan,
    std: float = np.nan,
    window: tuple[float, float] = (40.0, 400.0),
) -> tuple[np.float32, np.float32, np.float32, np.float32]:
    """``(shift, scale, low, high)`` in float32: a normalised value is
    ``clip((float32(x) - shift) * scale, low, high)``, each step rounded to float32.

    The one definition both the stream's float32 output (:func:`normalizer`) and
    :func:`voxlake.training.normalize_on_device` evaluate, which is why they agree bit
    for bit. ``zscore`` needs finite ``mean`` and ``std > 0``; the caller supplies
    fallbacks. ``low``/``high`` are -inf/+inf when nothing is clipped.
    """
    inf = np.float32(np.inf)
    if method == "zscore":
        return np.float32(mean), np.float32(1.0 / max(float(std), 1e-6)), -inf, inf
    if method == "ct_window":
        center, width = window
        low = np.float32(center - width / 2.0)
        return low, np.float32(1.0 / width), np.float32(0.0), np.float32(1.0)
    return np.float32(0.0), np.float32(1.0), -inf, inf


def normalizer(
    method: str,
    *,
    mean: float = np.nan,
    std: float = np.nan,
    window: tuple[float, float] = (40.0, 400.0),
) -> Emit:
    """``emit(part, out)`` writing ``part`` z-scored, CT-windowed to [0, 1] or raw into the
    float32 view ``out`` (:func:`normalization_params`): the conversion and the arithmetic
    fused into two passes over a chunk-sized view, with no intermediate array (the lean
    reader calls it per decoded chunk, in its threads, while the chunk is in cache).
    """
    shift, scale, low, high = normalization_params(method, mean=mean, std=std, window=window)
    # The arithmetic runs in a contiguous per-thread scratch array (cache-resident), and
    # ``out`` (a strided view of a large, often freshly allocated image) is written once:
    # measured 105 against 162 us per 64^3 chunk for converting and scaling in ``out``.
    if method == "zscore":

        def emit_zscore(part: np.ndarray, out: np.ndarray) -> None:
            tmp = _scratch(part.shape)
            np.subtract(part, shift, out=tmp, dtype=np.float32, casting="unsafe")
            np.multiply(tmp, scale, out=out)

        return emit_zscore
    if method == "ct_window":

        def emit_window(part: np.ndarray, out: np.ndarray) -> None:
            tmp = _scratch(part.shape)
            np.subtract(part, shift, out=tmp, dtype=np.float32, casting="unsafe")
            tmp *= scale
            np.clip(tmp, low, high, out=out)

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


class BufferPool:
    """Up to ``size`` private image buffers, each handed out again only once nothing
    outside the pool refers to it any more.

    A buffer is free when the pool holds the only reference to its numpy array: a tensor
    made from it (``torch.from_numpy``), any view of that tensor, its storage or a numpy
    view of it all keep the array referenced, so memory a caller can still reach is never
    overwritten, whatever the caller does with the sample. Reusing a warm buffer saves
    faulting in (and zeroing) fresh pages per sample; ``size == 0`` disables the pool.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.reused = 0  # buffers handed out again (tests and benchmarks read it)
        self._lock = threading.Lock()
        self._buffers: list[np.ndarray] = []
        # The count of an array only a list holds, measured the way take() counts (the
        # interpreter's own references differ between versions; a guess would be unsafe).
        probe = [np.empty(0)]
        self._free_refs = sys.getrefcount(probe[0])

    def take(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray | None:
        """A free buffer of ``shape`` and ``dtype`` (contents undefined), a new one kept
        by the pool while it has room, or None (the caller allocates its own)."""
        if self.size <= 0:
            return None
        with self._lock:
            spare = None
            for i in range(len(self._buffers)):
                # No local name may hold the array while it is counted: any reference
                # beyond the list's is a user's.
                if sys.getrefcount(self._buffers[i]) > self._free_refs:
                    continue
                if self._buffers[i].shape == shape and self._buffers[i].dtype == dtype:
                    self.reused += 1
                    return self._buffers[i]
                spare = i
            if spare is not None:  # a free buffer of another shape makes room
                del self._buffers[spare]
            if len(self._buffers) >= self.size:
                return None
            buffer = np.empty(shape, dtype)
            self._buffers.append(buffer)
            return buffer


def output_tensor(
    shape: tuple[int, ...],
    *,
    zero: bool = False,
    shared: bool = True,
    dtype: np.dtype[Any] | type = np.float32,
    pool: BufferPool | None = None,
) -> torch.Tensor:
    """A tensor (``dtype``, float32 by default) for a sample's image; in shared memory
    inside a DataLoader worker when ``shared``.

    A worker's samples reach the main process through shared memory. Writing the image
    there from the start means sending it costs nothing more (with
    :func:`voxlake.training.collate_samples` and one sample per batch, not even the
    batch's stacking copy). Fresh shared pages cost more to fault in than private ones,
    so callers pass ``shared=False`` when the image will be copied anyway (batches of
    several samples, augmentation, transforms). A private image comes from ``pool``
    when it has a free buffer (zero-filled only when ``zero``).
    """
    from torch.utils.data import get_worker_info

    if not shared or get_worker_info() is None:
        reused = None if pool is None else pool.take(tuple(shape), np.dtype(dtype))
        if reused is not None:
            if zero:
                reused.fill(0)
            return torch.from_numpy(reused)
        # numpy asks for transparent huge pages on large allocations, torch does not:
        # measured 3 to 7 ms against 15 to 28 ms to allocate and fill a 34 MB volume.
        return torch.from_numpy(np.zeros(shape, dtype) if zero else np.empty(shape, dtype))
    count = int(np.prod(shape))
    empty = torch.from_numpy(np.empty(0, dtype))
    # Fresh shared pages are zeros.
    storage: Any = torch.UntypedStorage._new_shared(count * empty.element_size())
    strides = [int(np.prod(shape[i + 1 :])) for i in range(len(shape))]
    tensor: torch.Tensor = torch.empty(0, dtype=empty.dtype).set_(storage, 0, shape, strides)
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
