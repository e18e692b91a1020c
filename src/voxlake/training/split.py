"""Deterministic train / validation / test splits that stay put as data grows.

Each key (normally ``patient_key``, so no patient straddles two splits) is hashed with the
seed to a number ``u`` in [0, 1); ``u < f_train`` is train, ``u < f_train + f_val`` is
validation, the rest test. A key's split depends on nothing but the key and the seed, so
adding patients never moves existing ones.

The implementation lives in :mod:`voxlake.splits`, shared with the splits the catalog
persists (:func:`voxlake.catalog.save_split`); this module re-exports it.
"""

from __future__ import annotations

from voxlake.splits import SPLITS, assign_split, hash_uniform, split_frame

__all__ = ["SPLITS", "assign_split", "hash_uniform", "split_frame"]
