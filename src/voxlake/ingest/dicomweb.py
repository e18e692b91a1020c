"""A PACS as a source: QIDO-RS search and WADO-RS retrieve over DICOMweb.

A source URL is the DICOMweb root with ``dicomweb+`` in front of the scheme and the QIDO
filters as query parameters, for example::

    dicomweb+http://pacs.local:8042/dicom-web?StudyInstanceUID=1.2.3
    dicomweb+https://pacs.example.org/dicom-web?Modality=CT&StudyDate=20240101-20240131

Each matching instance is retrieved with WADO-RS in its stored transfer syntax
(``transfer-syntax=*``), so the bytes are exactly what the modality sent.

WADO-RS URLs name the instance by its original UIDs, which must never reach the catalog
(PS3.15 replaces UIDs). So every instance has two addresses: the catalog URL
``dicomweb+http://host/dicom-web/instances/<instance_key>`` (keyed hash of the
SOPInstanceUID) and the *locator*, the real WADO-RS URL, which lives only in memory on the
driver and the workers during a run. A volume whose instances were not listed in the
current run (the source was not given again) fails with ``source_unavailable``.

Authentication: ``storage_options={"headers": {"Authorization": "Bearer ..."}}`` or
``{"auth": ["user", "password"]}``. HTTPS certificates are checked against the system's
trusted authorities; ``{"verify": "/path/to/ca.pem"}`` names the hospital's own authority
instead (``{"verify": False}`` turns the check off, for test servers only).
"""

from __future__ import annotations

import email.parser
import urllib.parse
from typing import TYPE_CHECKING, Any

from voxlake.errors import SourceError
from voxlake.ingest.sources import UID_PATTERN
from voxlake.keys import keyed_hash

if TYPE_CHECKING:
    from collections.abc import Iterator

    from voxlake.ingest.sources import FileRef, ListingProblem

__all__ = ["fetch_instance", "is_dicomweb", "list_instances"]

_PREFIXES = ("dicomweb+http://", "dicomweb+https://")
_PAGE = 1000
_TAGS = {"study": "0020000D", "series": "0020000E", "sop": "00080018"}
_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def is_dicomweb(url: str) -> bool:
    """True for ``dicomweb+http(s)://`` source URLs, catalog URLs and locators."""
    return url.startswith(_PREFIXES)


def _split(url: str) -> tuple[str, dict[str, str]]:
    """(HTTP root without trailing slash, QIDO filters) of a ``dicomweb+`` URL."""
    parsed = urllib.parse.urlsplit(url[len("dicomweb+") :])
    root = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, parsed.path.rstrip("/"), "", ""))
    filters = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=False))
    return root, filters


def _request_options(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    options = dict(storage_options or {})
    out: dict[str, Any] = {"timeout": float(options.get("timeout", 60))}
    if "headers" in options:
        out["headers"] = dict(options["headers"])
    if "auth" in options:
        out["auth"] = tuple(options["auth"])
    if "verify" in options:
        out["verify"] = options["verify"]
    return out


_AUTH_HINT = (
    'give credentials in --storage-options: {"auth": ["user", "password"]} or '
    '{"headers": {"Authorization": "Bearer ..."}}'
)
_TLS_HINT = (
    "the server's certificate is not signed by an authority this machine trusts: name "
    'yours in --storage-options, {"verify": "/path/to/ca.pem"}'
)


def _request_error(what: str, exc: Exception, code: str | None) -> SourceError:
    """A clear error for a request that got no answer (a TLS failure says how to fix it)."""
    import requests

    if isinstance(exc, requests.exceptions.SSLError):
        return SourceError(
            f"{what}: the TLS handshake failed (SSLError)", code=code, hint=_TLS_HINT
        )
    return SourceError(f"{what}: {type(exc).__name__}", code=code)


def _status_error(what: str, status: int, code: str | None) -> SourceError:
    """A clear error for an HTTP answer other than success (refused credentials say so)."""
    if status in (401, 403):
        refused = "needs credentials" if status == 401 else "refused these credentials"
        return SourceError(
            f"{what} failed with HTTP {status}: the server {refused}", code=code, hint=_AUTH_HINT
        )
    return SourceError(f"{what} failed with HTTP {status}", code=code)


def _value(item: dict[str, Any], tag: str) -> str:
    try:
        return str(item[tag]["Value"][0])
    except (KeyError, IndexError, TypeError):
        return ""


def list_instances(
    url: str, *, secret: str, storage_options: dict[str, Any] | None = None
) -> Iterator[FileRef | ListingProblem]:
    """Yield one :class:`FileRef` per instance matching the URL's QIDO filters (and a
    ``bad_response`` problem per answer whose UIDs are not UIDs)."""
    import requests

    from voxlake.ingest.sources import FileRef, ListingProblem

    root, filters = _split(url)
    options = _request_options(storage_options)
    headers = {"Accept": "application/dicom+json", **options.pop("headers", {})}
    offset = 0
    fields = ",".join(_TAGS.values())
    while True:
        params = {**filters, "includefield": fields, "limit": str(_PAGE), "offset": str(offset)}
        try:
            response = requests.get(f"{root}/instances", params=params, headers=headers, **options)
        except requests.RequestException as exc:
            raise _request_error("DICOMweb server unreachable", exc, "source_unreachable") from exc
        if response.status_code == 204:
            return
        if response.status_code != 200:
            raise _status_error("QIDO-RS search", response.status_code, "source_unreachable")
        items = response.json() or []
        for item in items:
            study, series, sop = (_value(item, tag) for tag in _TAGS.values())
            if not (study and series and sop):
                continue
            safe = f"dicomweb+{root}/instances/{keyed_hash(secret, 'instance', sop)}"
            if not all(len(uid) <= 64 and UID_PATTERN.match(uid) for uid in (study, series, sop)):
                yield ListingProblem(safe, "bad_response", "QIDO-RS answered a malformed UID")
                continue
            locator = f"dicomweb+{root}/studies/{study}/series/{series}/instances/{sop}"
            yield FileRef(safe, 0, 0.0, locator=locator)
        if len(items) < _PAGE:
            return
        offset += len(items)


def fetch_instance(
    locator: str, *, max_bytes: int, storage_options: dict[str, Any] | None = None
) -> bytes:
    """Retrieve one instance's original bytes with WADO-RS (multipart/related)."""
    import requests

    if "/studies/" not in locator:
        raise SourceError(
            "this DICOMweb instance was not listed in the current run",
            code="source_unavailable",
            hint="give the DICOMweb source again so its instances can be located",
        )
    options = _request_options(storage_options)
    headers = {"Accept": _ACCEPT, **options.pop("headers", {})}
    try:
        response = requests.get(
            locator[len("dicomweb+") :], headers=headers, stream=True, **options
        )
        body = response.raw.read(max_bytes + 1, decode_content=True)
    except requests.RequestException as exc:
        raise _request_error("WADO-RS retrieve failed", exc, None) from exc
    if response.status_code != 200:
        raise _status_error("WADO-RS retrieve", response.status_code, None)
    if len(body) > max_bytes:
        raise SourceError(f"instance larger than the {max_bytes} byte cap", code="file_too_large")
    content_type = response.headers.get("Content-Type", "")
    if not content_type.startswith("multipart/"):
        return bytes(body)
    message = email.parser.BytesParser().parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    parts = [p.get_payload(decode=True) for p in message.walk() if not p.is_multipart()]
    if len(parts) != 1 or not isinstance(parts[0], bytes):
        raise SourceError("WADO-RS returned an unexpected multipart body", code="bad_response")
    return parts[0]
