"""Storage options: one dictionary for sources, the volume store and the catalog.

voxlake reads sources and the Zarr store through fsspec (``s3fs`` for ``s3://``) and the
catalog through delta-rs; the two spell the same S3 settings differently. Users pass the
fsspec spelling everywhere (``{"key": ..., "secret": ..., "client_kwargs":
{"endpoint_url": ..., "region_name": ...}}``) and :func:`delta_storage_options` translates
it for delta-rs. Options already in delta-rs spelling (``AWS_*`` keys) pass through. With
no options at all, both libraries read the standard ``AWS_*`` environment variables
(``AWS_ENDPOINT_URL`` included), which is the recommended way to pass credentials.
"""

from __future__ import annotations

from typing import Any

__all__ = ["delta_storage_options", "s3_options"]


def s3_options(
    endpoint_url: str | None = None,
    *,
    key: str | None = None,
    secret: str | None = None,
    region: str = "us-east-1",
) -> dict[str, Any]:
    """fsspec options for an S3-compatible endpoint (MinIO, moto, Ceph...)."""
    options: dict[str, Any] = {"client_kwargs": {"region_name": region}}
    if endpoint_url:
        options["client_kwargs"]["endpoint_url"] = endpoint_url
    if key is not None:
        options["key"] = key
    if secret is not None:
        options["secret"] = secret
    return options


def delta_storage_options(options: dict[str, Any] | None) -> dict[str, str] | None:
    """Translate fsspec-style S3 options to delta-rs ``storage_options`` (strings only)."""
    if not options:
        return None
    out: dict[str, str] = {}
    client = options.get("client_kwargs") or {}
    endpoint = client.get("endpoint_url") or options.get("endpoint_url")
    mapping = {
        "key": "AWS_ACCESS_KEY_ID",
        "secret": "AWS_SECRET_ACCESS_KEY",
        "token": "AWS_SESSION_TOKEN",
    }
    for name, value in options.items():
        if name in mapping and value is not None:
            out[mapping[name]] = str(value)
        elif name.isupper():  # already delta-rs / object_store spelling
            out[name] = str(value)
    if endpoint:
        out["AWS_ENDPOINT_URL"] = str(endpoint)
        if str(endpoint).startswith("http://"):
            out.setdefault("AWS_ALLOW_HTTP", "true")
    region = client.get("region_name") or options.get("region_name")
    if region:
        out.setdefault("AWS_REGION", str(region))
    return out or None
