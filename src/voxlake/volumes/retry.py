"""Retry transient read errors of a zarr store with bounded exponential backoff.

Object stores fail now and then (connection resets, timeouts, throttling, 5xx). A
training job should ride through a blip rather than die hours in, but must not retry
errors that will never succeed (missing keys, permissions, bad requests).
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from voxlake.volumes._wrapper import ReadWrapper

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable

    from zarr.abc.store import ByteRequest, Store
    from zarr.core.buffer import Buffer, BufferPrototype

__all__ = ["RetryPolicy", "RetryingStore", "is_transient"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_RETRYABLE_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeoutException",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "InternalError",
        "ServiceUnavailable",
        "RequestLimitExceeded",
    }
)


def _class_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def is_transient(exc: BaseException) -> bool:
    """Whether a read that raised ``exc`` may succeed if tried again.

    Transient: ``OSError`` (connection refused or reset, timeouts) except missing paths
    and permissions; botocore / aiohttp connection errors; S3 ``ClientError`` with a
    throttling or server-side code (5xx). Everything else is permanent.
    """
    if isinstance(exc, _PERMANENT):
        return False
    names = _class_names(exc)
    if "ClientError" in names and hasattr(exc, "response"):
        error = getattr(exc, "response", {}) or {}
        code = str(error.get("Error", {}).get("Code", ""))
        status = int(error.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return code in _RETRYABLE_CODES or status >= 500 or status == 429
    if isinstance(exc, OSError):
        return True
    # botocore's connection errors are not OSErrors; aiohttp's ClientError covers resets.
    return bool(names & {"BotoCoreError", "ClientConnectionError", "ClientPayloadError"})


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently to retry.

    Attributes
    ----------
    attempts
        Tries in total (1 means no retry).
    base_delay
        Delay before the second try, in seconds; doubled before each further try.
    max_delay
        Cap on any single delay.
    jitter
        Each delay is drawn uniformly from ``[(1 - jitter) * d, d]`` so that many
        workers hit by the same outage do not retry in lockstep.
    """

    attempts: int = 5
    base_delay: float = 0.1
    max_delay: float = 5.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("attempts must be >= 1 and delays non-negative")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** (retry - 1))
        return float(ceiling * (1.0 - self.jitter * random.random()))


class RetryingStore(ReadWrapper):
    """Retry the reads of a zarr store on transient errors (see :func:`is_transient`).

    Parameters
    ----------
    store
        The store to wrap.
    policy
        Attempts and backoff.

    Attributes
    ----------
    retries
        Retries performed so far (reads that succeeded on the first try count 0).
    """

    def __init__(self, store: Store, policy: RetryPolicy | None = None) -> None:
        super().__init__(store)
        self.policy = policy or RetryPolicy()
        self.retries = 0

    def _with_store(self, store: Store) -> RetryingStore:
        return type(self)(store, self.policy)

    def __repr__(self) -> str:
        return f"RetryingStore({self._store!r}, attempts={self.policy.attempts})"

    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(1, self.policy.attempts + 1):
            try:
                return await call()
            except Exception as exc:
                if attempt == self.policy.attempts or not is_transient(exc):
                    raise
                delay = self.policy.delay(attempt)
                self.retries += 1
                logger.warning(
                    "transient error reading %s (try %d of %d), retrying in %.2f s: %r",
                    what,
                    attempt,
                    self.policy.attempts,
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        return await self._retry(key, lambda: self._store.get(key, prototype, byte_range))

    async def get_partial_values(
        self,
        prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        return await self._retry(
            f"{len(key_ranges)} ranges",
            lambda: self._store.get_partial_values(prototype, key_ranges),
        )

    async def exists(self, key: str) -> bool:
        return await self._retry(key, lambda: self._store.exists(key))

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)
