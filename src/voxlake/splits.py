"""Deterministic train / validation / test splits that stay put as data grows.

Each key (normally ``patient_key``, so no patient straddles two splits) is hashed with the
seed to a number ``u`` in [0, 1); ``u < f_train`` is train, ``u < f_train + f_val`` is
validation, the rest test. A key's split depends on nothing but the key and the seed, so
adding patients never moves existing ones.

This is the one implementation: :mod:`voxlake.catalog.splits` persists assignments made
with it in the catalog's ``splits`` table and :mod:`voxlake.training.split` re-exports it.
Like :mod:`voxlake.keys` it imports nothing heavy, so training can use it without
importing the catalog.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from voxlake.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "SPLITS",
    "assign_split",
    "check_fractions",
    "format_fractions",
    "hash_uniform",
    "split_frame",
]

#: Split names, in the order of the ``fractions`` argument.
SPLITS: tuple[str, str, str] = ("train", "validation", "test")


def hash_uniform(key: str, seed: int = 0) -> float:
    """Map ``(seed, key)`` to a number in [0, 1) with SHA-256 (stable across processes)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate train / validation / test fractions; return them as a float triple.

    Raises
    ------
    ConfigError
        (a ``ValueError``) unless there are three non-negative numbers summing to 1 with a
        positive train share.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions):
        raise ConfigError(
            f"fractions must be three non-negative numbers, got {format_fractions(fractions)}"
        )
    if abs(sum(fractions) - 1.0) > 1e-6 or fractions[0] <= 0:
        raise ConfigError(
            f"fractions must sum to 1 with a positive train part, got {format_fractions(fractions)}"
        )
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))


def format_fractions(fractions: Sequence[float]) -> str:
    """Fractions as people write them, ``[0.7, 0.15, 0.15]`` (numpy scalars, as read from
    the catalog, printed ``np.float64(0.7)``)."""
    return "[" + ", ".join(_number(f) for f in fractions) + "]"


def _number(value: object) -> str:
    try:
        return repr(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return repr(value)


def _distance(u: float, low: float, high: float) -> float:
    return 0.0 if low <= u < high else min(abs(u - low), abs(u - high))


def assign_split(
    keys: Sequence[str],
    *,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> list[str]:
    """Assign ``"train"``, ``"validation"`` or ``"test"`` to each key.

    Parameters
    ----------
    keys
        Grouping keys, repeated keys allowed (they get the same split).
    fractions
        Expected shares of distinct keys for train, validation and test (sum to 1).
    seed
        Changes every assignment; keep it fixed for a project.

    Returns
    -------
    list of str
        The split of each key, aligned with ``keys``.

    Notes
    -----
    Small datasets: hashing alone can leave a split empty (with 3 keys, all may land in
    train). When there are at least 3 distinct keys, every split with a positive fraction
    gets at least one key, and train always gets one. A split left empty by hashing
    (checked in the order train, test, validation) receives the key whose hash ``u`` lies
    nearest to that split's interval, taken from a split that keeps at least one key
    (ties broken by key). This is deterministic and moves as few keys as possible, from
    the boundary, but it is the one place where stability can break: an overridden key
    returns to its hashed split once the data grows enough for hashing alone to fill
    every split. Keys assigned by their hash never move. With many keys (the common case)
    no override happens. Splits persisted in the catalog
    (:func:`voxlake.catalog.save_split`) never move a key once written, overrides included.
    """
    bounds = check_fractions(fractions)
    edges = (0.0, bounds[0], bounds[0] + bounds[1], 1.0)
    distinct = sorted(set(keys))
    u = {key: hash_uniform(key, seed) for key in distinct}
    split: dict[str, int] = {}
    for key in distinct:
        split[key] = 0 if u[key] < edges[1] else 1 if u[key] < edges[2] else 2
    if len(distinct) >= 3:
        for target in (0, 2, 1):
            counts = [sum(1 for s in split.values() if s == i) for i in range(3)]
            if counts[target] or (target and bounds[target] == 0):
                continue
            donors = [k for k in distinct if counts[split[k]] > 1]
            best = min(donors, key=lambda k: (_distance(u[k], *edges[target : target + 2]), k))
            split[best] = target
    elif distinct and all(s != 0 for s in split.values()):
        split[min(distinct, key=lambda k: (u[k], k))] = 0
    return [SPLITS[split[key]] for key in keys]


def split_frame(
    df: pd.DataFrame,
    by: str = "patient_key",
    *,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    column: str = "split",
) -> pd.DataFrame:
    """Return a copy of ``df`` with a ``split`` column assigned per value of ``df[by]``.

    Rows sharing a key (a patient's studies and series) always share a split, so no
    patient leaks between train and evaluation. See :func:`assign_split`.
    """
    if by not in df.columns:
        raise ConfigError(f"cannot split by {by!r}: no such column")
    out = df.copy()
    out[column] = assign_split([str(k) for k in df[by].tolist()], fractions=fractions, seed=seed)
    return out
