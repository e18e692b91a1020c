"""A PACS as a source over classic DICOM networking: C-FIND search and C-GET retrieve.

For the many PACS that speak DIMSE but not DICOMweb. A source URL names the PACS's AE
title, host and port, with C-FIND filters (DICOM keywords) as query parameters::

    dimse://ORTHANC@pacs.local:4242?StudyInstanceUID=1.2.3
    dimse://PACS@10.0.0.5:104?Modality=CT&StudyDate=20240101-20240131

The search is hierarchical (Study Root): studies matching the patient and study filters,
their series matching the series filters, and those series' instances. Each instance is
then retrieved with C-GET (no C-MOVE: the PACS sends the instance back on the association
voxlake opened, so it needs no route back to the workers), on associations kept open for a
header task or a volume build (:class:`Associations`). Each transfer syntax voxlake can
decode is proposed in its own presentation context, so the PACS can send the instance as
stored rather than transcode it. What arrives is the dataset, not the PACS's file: the
file meta information is rebuilt from the association, so ``instances.content_hash``
differs from a hash of the file on the PACS's disk.

As with DICOMweb, C-GET addresses name the instance by its original UIDs, which must
never reach the catalog: the catalog URL is
``dimse://AET@host:port/instances/<instance_key>`` (keyed hash of the SOPInstanceUID) and
the *locator*, with the UIDs, lives only in memory during a run.

Options (``storage_options``): ``{"ae_title": "VOXLAKE"}`` is the calling AE title (the
one the PACS must know; default ``VOXLAKE``), ``{"timeout": 60}`` the network, ACSE and
DIMSE timeouts in seconds. DICOM over TLS (PS3.15 Annex B, usually port 2762):
``{"tls_ca": "/path/ca.pem"}`` checks the PACS's certificate against that authority
(``{"tls": true}``: against the system's), and ``{"tls_cert": ..., "tls_key": ...}``
present a client certificate where the PACS asks for one. Needs ``pynetdicom``
(``pip install 'voxlake[pacs]'``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from voxlake.errors import ConfigError, SourceError
from voxlake.ingest.sources import UID_PATTERN
from voxlake.keys import keyed_hash

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from pydicom.dataset import Dataset

    from voxlake.ingest.sources import FileRef, ListingProblem

__all__ = ["Associations", "fetch_instance", "is_dimse", "list_instances"]

logger = logging.getLogger(__name__)

_PREFIX = "dimse://"
#: Keywords searched at the series and instance levels; any other is a patient or study key.
_SERIES_KEYS = frozenset(
    {"Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "SeriesDate",
     "SeriesTime", "BodyPartExamined", "ProtocolName", "Laterality"}
)  # fmt: skip
_IMAGE_KEYS = frozenset({"SOPInstanceUID", "SOPClassUID", "InstanceNumber"})
_AE = re.compile(r"^[ -\[\]-~]{1,16}$")  # PS3.5 AE: 16 characters, no backslash
_PENDING = (0xFF00, 0xFF01)
_PERMISSION_HINT = (
    "check that the PACS knows voxlake's calling AE title (storage option ae_title, default "
    "VOXLAKE) and lets it query and retrieve"
)
#: Transfer syntaxes offered for C-GET's C-STORE sub-operations, each in its own context.
_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)


@dataclass(frozen=True)
class _Peer:
    aet: str  # called AE title (the PACS)
    host: str
    port: int

    @property
    def root(self) -> str:
        return f"{_PREFIX}{self.aet}@{self.host}:{self.port}"


def is_dimse(url: str) -> bool:
    """True for ``dimse://`` source URLs, catalog URLs and locators."""
    return url.startswith(_PREFIX)


def _split(url: str) -> tuple[_Peer, str, dict[str, str]]:
    """(peer, path, C-FIND filters) of a ``dimse://AET@host:port/path?filters`` URL."""
    parsed = urllib.parse.urlsplit(url)
    aet = urllib.parse.unquote(parsed.username or "")
    try:
        port = parsed.port
    except ValueError:
        port = None
    if not aet or not _AE.match(aet) or not parsed.hostname or port is None:
        # The URL is not quoted: its filters can hold identifiers (PatientID=...), and a
        # failed run's message is kept in the catalog's runs table.
        raise ConfigError(
            "not a DIMSE source URL: it needs the PACS's AE title, host and port",
            hint="dimse://AET@HOST:PORT?StudyInstanceUID=...",
        )
    filters = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=False))
    return _Peer(aet, parsed.hostname, port), parsed.path, filters


@dataclass(frozen=True)
class _Options:
    """The storage options of a DIMSE source (hashable: associations are keyed by them)."""

    calling: str  # our AE title
    timeout: float
    tls: tuple[str | None, str | None, str | None] | None = None  # (ca, cert, key)

    def tls_args(self, peer: _Peer) -> tuple[Any, str] | None:
        """pynetdicom's ``tls_args``: a client context checking the PACS's certificate
        (and its host name) against ``ca``, or the system's authorities."""
        if self.tls is None:
            return None
        import ssl

        for name, path in zip(("tls_ca", "tls_cert", "tls_key"), self.tls, strict=True):
            if path and not os.path.isfile(path):  # checked per association, not per instance
                raise ConfigError(f"{name}: no such file: {path}")
        ca, cert, key = self.tls
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        if cert:
            context.load_cert_chain(cert, key)
        return context, peer.host


def _options(storage_options: dict[str, Any] | None) -> _Options:
    options = storage_options or {}
    calling = str(options.get("ae_title", "VOXLAKE"))
    if not _AE.match(calling):
        raise ConfigError(f"not an AE title: {calling!r}", hint="up to 16 characters, no '\\'")
    files = tuple(options.get(name) for name in ("tls_ca", "tls_cert", "tls_key"))
    tls = None
    if options.get("tls") or any(files):
        if files[2] and not files[1]:
            raise ConfigError("tls_key needs tls_cert", hint="the client certificate it goes with")
        tls = tuple(str(f) if f else None for f in files)
    return _Options(calling, float(options.get("timeout", 60)), tls)  # type: ignore[arg-type]


def _application_entity(options: _Options) -> Any:
    try:
        from pynetdicom import AE
    except ImportError as exc:
        raise ConfigError(
            "a DIMSE source needs pynetdicom", hint="pip install 'voxlake[pacs]'"
        ) from exc
    ae = AE(ae_title=options.calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = options.timeout
    return ae


def _associate(ae: Any, peer: _Peer, options: _Options, **kwargs: Any) -> Any:
    tls = options.tls_args(peer)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.aet, tls_args=tls, **kwargs)
    if not assoc.is_established:
        what = "rejected the association" if assoc.is_rejected else "is unreachable"
        hint = "check the AE titles (calling: storage option ae_title), host and port"
        if tls is not None and not assoc.is_rejected:
            hint += (
                "; over TLS, the PACS's certificate must be signed by tls_ca (or a system"
                " authority) for that host name, and a PACS that asks for a client"
                " certificate needs tls_cert and tls_key"
            )
        raise SourceError(
            f"DIMSE peer {peer.aet}@{peer.host}:{peer.port} {what}",
            code="source_unreachable",
            hint=hint,
        )
    # Each DIMSE exchange is a few small writes: with Nagle's algorithm on, every one can
    # wait for a delayed ACK (40 ms on Linux), which measured 88 -> 47 ms per C-FIND and
    # 134 -> 92 ms per C-GET against Orthanc on loopback (3 and 8 ms with the PACS's side
    # off too). pynetdicom has no option for it; its socket is reached where it lives.
    with contextlib.suppress(AttributeError, OSError):
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def _check_keywords(filters: dict[str, str]) -> None:
    """Refuse a filter that is no DICOM keyword (before connecting: a usage error)."""
    from pydicom.datadict import tag_for_keyword

    for keyword in filters:
        if tag_for_keyword(keyword) is None:
            raise ConfigError(f"not a DICOM keyword in the DIMSE query: {keyword!r}")


def _query(level: str, keys: dict[str, str], returned: tuple[str, ...]) -> Dataset:
    from pydicom.dataset import Dataset

    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    for keyword in returned:
        if keyword not in query:
            setattr(query, keyword, "")
    return query


class _NoAnswer(SourceError):
    """A C-FIND without an answer: the association was aborted or the DIMSE timeout hit."""


def _find(assoc: Any, query: Dataset, model: Any) -> list[Dataset]:
    answers = []
    for status, identifier in assoc.send_c_find(query, model):
        if not status:  # no answer in time, or the PACS aborted the association
            raise _NoAnswer(
                "the PACS aborted the association or did not answer a C-FIND",
                code="source_unreachable",
                hint=_PERMISSION_HINT,
            )
        if status.Status in _PENDING:
            answers.append(identifier)
        elif status.Status != 0x0000:
            raise SourceError(
                f"C-FIND failed with status 0x{status.Status:04X}", code="source_unreachable"
            )
    return answers


def _uid(answer: Dataset, keyword: str) -> str:
    return str(answer.get(keyword, "") or "").strip()


class _Finder:
    """C-FINDs on one association; a C-FIND left without an answer is asked once more on
    a new association (pynetdicom, rarely, takes a fast answer for a request of the
    peer's, logs "Received unexpected C-FIND service message" and drops it)."""

    def __init__(self, ae: Any, peer: _Peer, options: _Options, model: Any) -> None:
        self._ae, self._peer, self._options, self._model = ae, peer, options, model
        self.assoc = _associate(ae, peer, options)

    def __call__(self, query: Dataset) -> list[Dataset]:
        try:
            return _find(self.assoc, query, self._model)
        except _NoAnswer:
            logger.warning("a C-FIND went unanswered: asking again on a new association")
            self.assoc.abort()
            self.assoc = _associate(self._ae, self._peer, self._options)
            return _find(self.assoc, query, self._model)


def _instances(
    find: Callable[[Dataset], list[Dataset]], filters: dict[str, str]
) -> Iterator[tuple[str, str, Dataset]]:
    """(study UID, series UID, instance answer) of every instance the hierarchical search
    finds: each filter asked at its level; studies and series whose UID is malformed are
    left out."""
    series_keys = {k: v for k, v in filters.items() if k in _SERIES_KEYS}
    image_keys = {k: v for k, v in filters.items() if k in _IMAGE_KEYS}
    study_keys = {k: v for k, v in filters.items() if k not in series_keys and k not in image_keys}
    studies = find(_query("STUDY", study_keys, ("StudyInstanceUID",)))
    for study in (_uid(a, "StudyInstanceUID") for a in studies):
        if not UID_PATTERN.match(study):
            continue
        keys = {**series_keys, "StudyInstanceUID": study}
        answers = find(_query("SERIES", keys, ("SeriesInstanceUID",)))
        for series in (_uid(a, "SeriesInstanceUID") for a in answers):
            if not UID_PATTERN.match(series):
                continue
            keys = {**image_keys, "StudyInstanceUID": study, "SeriesInstanceUID": series}
            returned = ("SOPInstanceUID", "SOPClassUID")
            for answer in find(_query("IMAGE", keys, returned)):
                yield study, series, answer


def list_instances(
    url: str, *, secret: str, storage_options: dict[str, Any] | None = None
) -> Iterator[FileRef | ListingProblem]:
    """Yield one :class:`FileRef` per instance the URL's C-FIND filters match (and a
    ``bad_response`` problem per answer whose UIDs are not UIDs)."""
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind as FIND,
    )

    from voxlake.ingest.sources import FileRef, ListingProblem

    peer, _, filters = _split(url)
    options = _options(storage_options)
    _check_keywords(filters)
    ae = _application_entity(options)
    ae.add_requested_context(FIND)
    find = _Finder(ae, peer, options, FIND)
    try:
        for study, series, answer in _instances(find, filters):
            sop, sop_class = _uid(answer, "SOPInstanceUID"), _uid(answer, "SOPClassUID")
            if not sop:
                continue
            safe = f"{peer.root}/instances/{keyed_hash(secret, 'instance', sop)}"
            uids = (study, series, sop, sop_class)
            if not all(len(uid) <= 64 and UID_PATTERN.match(uid) for uid in uids):
                yield ListingProblem(safe, "bad_response", "C-FIND answered a malformed UID")
                continue
            locator = (
                f"{peer.root}/studies/{study}/series/{series}/instances/{sop}?class={sop_class}"
            )
            yield FileRef(safe, 0, 0.0, locator=locator)
    finally:
        find.assoc.release()


#: First byte of a P-DATA-TF PDU (DICOM PS3.8 9.3.5).
_P_DATA = b"\x04"
#: What a C-GET's PDUs carry besides the instance: command sets and PDV headers.
_COMMAND_ROOM = 64 << 10
#: Seconds the network thread waits, past the cap, for the C-GET's thread to abort.
_ABORT_WAIT = 10.0


class _Getter:
    """One association for C-GET of one SOP class, with the C-STORE handler that catches
    what the PACS sends back on it."""

    def __init__(self, peer: _Peer, options: _Options, sop_class: str) -> None:
        from pynetdicom import build_role, evt

        ae = _application_entity(options)
        ae.add_requested_context(_get_model())
        for syntax in _SYNTAXES:  # one context per syntax: the PACS picks the stored one
            ae.add_requested_context(sop_class, syntax)
        self.received: list[bytes] = []
        self.too_large = False
        self.max_bytes = 0
        self.received_bytes = 0  # P-DATA of the C-GET under way
        role = build_role(sop_class, scp_role=True)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_DATA_RECV, self._on_data)]
        self.assoc = _associate(ae, peer, options, ext_neg=[role], evt_handlers=handlers)

    def _on_data(self, event: Any) -> None:
        """Count the C-GET's data as each PDU arrives (in pynetdicom's network thread).

        pynetdicom gathers a whole instance in memory before ``_on_store`` sees it, so the
        cap is also applied here: once the PDUs of this C-GET carry more than the cap
        (plus room for command sets and PDU headers), the C-GET's wait for its next
        message is ended at once, and this thread reads nothing more until the waiting
        thread has aborted the association (pynetdicom does that, and logs it as a DIMSE
        timeout). ``_on_store`` still applies the exact cap to what arrives whole.
        """
        data = event.data
        if data[:1] != _P_DATA or not self.max_bytes or self.too_large:
            return
        self.received_bytes += len(data)
        if self.received_bytes <= self.max_bytes + self.max_bytes // 1000 + _COMMAND_ROOM:
            return
        self.too_large = True
        assoc = event.assoc
        try:
            # The waiting thread takes this as "no response". Aborting from here instead
            # would also wake pynetdicom's association thread, which could take it first.
            assoc.dimse.msg_queue.put((None, None))
        except AttributeError:  # another pynetdicom: the wait ends at the DIMSE timeout
            assoc.abort(block=False)
            return
        deadline = time.monotonic() + _ABORT_WAIT
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.005)

    def _on_store(self, event: Any) -> int:
        data = event.encoded_dataset(include_meta=True)
        if len(data) > self.max_bytes:
            self.too_large = True
            return 0xA700  # out of resources: the PACS stops sending
        self.received.append(data)
        return 0x0000

    def get(self, study: str, series: str, sop: str, max_bytes: int) -> tuple[list[bytes], Any]:
        """The instances the PACS sent for one C-GET, and its statuses."""
        self.received, self.too_large, self.max_bytes = [], False, max_bytes
        self.received_bytes = 0
        identifier = _query("IMAGE", {}, ())
        identifier.StudyInstanceUID, identifier.SeriesInstanceUID = study, series
        identifier.SOPInstanceUID = sop
        statuses = [status for status, _ in self.assoc.send_c_get(identifier, _get_model())]
        return self.received, statuses

    def release(self) -> None:
        with contextlib.suppress(Exception):
            self.assoc.release()


def _get_model() -> Any:
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelGet as GET,
    )

    return GET


class Associations:
    """C-GET associations kept open for a scope (a header task, a volume build) and released
    when it ends: one per thread, PACS and SOP class instead of one per instance.

    Use as a context manager and pass it to :func:`fetch_instance` (through
    ``open_bytes``); without one, each instance gets its own association.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[int, _Peer, _Options, str], _Getter] = {}

    def __enter__(self) -> Associations:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release every association this scope opened."""
        with self._lock:
            getters, self._open = list(self._open.values()), {}
        for getter in getters:
            getter.release()

    def getter(self, peer: _Peer, options: _Options, sop_class: str) -> tuple[_Getter, bool]:
        """This thread's association for ``sop_class`` at ``peer``, and whether it was
        open already (reused) rather than opened now."""
        key = (threading.get_ident(), peer, options, sop_class)
        with self._lock:
            getter = self._open.get(key)
        if getter is not None and getter.assoc.is_established:
            return getter, True
        getter = _Getter(peer, options, sop_class)
        with self._lock:
            self._open[key] = getter
        return getter, False

    def drop(self, getter: _Getter) -> None:
        """Forget (and release) an association that failed."""
        with self._lock:
            self._open = {k: g for k, g in self._open.items() if g is not getter}
        getter.release()


def fetch_instance(
    locator: str,
    *,
    max_bytes: int,
    storage_options: dict[str, Any] | None = None,
    associations: Associations | None = None,
) -> bytes:
    """Retrieve one instance with C-GET: the dataset as sent, with file meta, as a file.

    With ``associations``, the C-GET runs on an association of that scope (opened at the
    first instance of its thread and SOP class; a reused one that fails or goes unanswered
    is replaced once); without, on an association of its own. A C-GET left without any
    answer on a new association is asked once more on another (pynetdicom, rarely, drops
    a fast answer: see :class:`_Finder`).
    """
    if associations is None:
        with Associations() as own:
            return fetch_instance(
                locator, max_bytes=max_bytes, storage_options=storage_options, associations=own
            )
    peer, path, query = _split(locator)
    parts = path.strip("/").split("/")
    if len(parts) != 6 or parts[::2] != ["studies", "series", "instances"]:
        raise SourceError(
            "this DIMSE instance was not listed in the current run",
            code="source_unavailable",
            hint="give the DIMSE source again so its instances can be located",
        )
    study, series, sop = parts[1::2]
    sop_class = query.get("class", "")
    options = _options(storage_options)
    unanswered = 0  # C-GETs on new associations that got no answer at all
    while True:
        getter, reused = associations.getter(peer, options, sop_class)
        try:
            received, statuses = getter.get(study, series, sop, max_bytes)
        except Exception:
            associations.drop(getter)
            if getter.too_large:
                break
            if reused:  # the PACS may have closed it while idle: once more on a new one
                continue
            raise
        if received or getter.too_large or all(statuses):
            break
        associations.drop(getter)  # no answer: once more on a new association
        if not reused:
            unanswered += 1
            if unanswered == 2:
                break
            logger.warning("a C-GET went unanswered: asking again on a new association")
    if getter.too_large:  # an aborted association is replaced by the scope's next getter()
        raise SourceError(f"instance larger than the {max_bytes} byte cap", code="file_too_large")
    if len(received) != 1:
        codes = ", ".join(f"0x{s.Status:04X}" for s in statuses if s and "Status" in s)
        raise SourceError(
            f"C-GET returned {len(received)} instances instead of 1 (status {codes or 'none'})",
            code="source_unavailable",
            hint=_PERMISSION_HINT,
        )
    return received[0]
