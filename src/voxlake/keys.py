"""Keyed identifiers: the one place original identifiers become catalog keys.

``patient_key``, ``study_key``, ``series_key`` ... are HMAC-SHA256 of the original value
with the project secret, domain-separated by kind, truncated to 128 bits (32 hex chars).
The same input and secret always give the same key, so new data for a known patient joins
up, labels keyed by original identifiers can be attached later, and splits stay leak-free.
Without the secret a key cannot be linked back to an identifier.

Both ingest (de-identification on workers) and the catalog (attaching labels) use this
module; it imports nothing from either.
"""

from __future__ import annotations

import hashlib
import hmac

from voxlake.errors import SecretMissingError

__all__ = ["KEY_KINDS", "keyed_hash", "volume_id_for"]

#: Kinds of identifiers that get keys (the ``kind`` argument of :func:`keyed_hash`).
KEY_KINDS = ("patient", "study", "series", "instance", "frame_of_reference", "accession", "uid")

_SEP = "\x1f"


def keyed_hash(secret: str, kind: str, value: str) -> str:
    """Return the 32-hex-digit keyed hash of ``value`` of the given ``kind``.

    Parameters
    ----------
    secret
        Project secret (never stored anywhere by voxlake).
    kind
        Domain separator, one of :data:`KEY_KINDS`.
    value
        Original identifier, stripped of surrounding whitespace and trailing NULs first
        (DICOM pads values; ``"1.2.3 "`` and ``"1.2.3"`` are the same UID).
    """
    if not secret:
        raise SecretMissingError("an empty secret cannot key identifiers")
    message = f"{kind}{_SEP}{value.strip().rstrip(chr(0))}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()[:32]


def volume_id_for(series_key: str, split_key: str = "") -> str:
    """Deterministic volume id from a series key and the split key within the series.

    Derived from the already keyed ``series_key``, so it reveals nothing and is stable
    across re-runs with the same secret; safe as a path component (hex).
    """
    digest = hashlib.blake2b(f"{series_key}{_SEP}{split_key}".encode(), digest_size=12)
    return digest.hexdigest()
