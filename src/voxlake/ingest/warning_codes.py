"""Warnings the readers raise about a file, kept in the catalog as codes.

pydicom (and nibabel, and numpy while a file's values are converted) warn about what they
read and work around: an unknown character set, a value that does not decode, a file
that ends inside a sequence, more pixel data than NumberOfFrames says. Printed by a Dask
worker, such a warning names no file, is shown once per worker whatever the number of
files it concerns, and may quote the value it is about, which can identify a patient.

While a task :func:`records <recording>`, the warnings its thread raises are taken
instead of shown (and so are the WARNING records of pydicom's logger, which repeats them
there), and each becomes a stable code (:data:`WARNING_CODES`, documented in
``docs/reliability.md``): the header stage stores a file's codes in
``instances.warnings``, the volume stage a volume's in ``volumes.warnings``. The
message itself is never kept. Warnings of other threads, and voxlake's own
(:class:`~voxlake.errors.VoxlakeWarning`), are shown as they would have been.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

from voxlake.errors import VoxlakeWarning

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["WARNING_CODES", "Recording", "code_for", "recorded", "recording"]

#: Code, what it means, and the start of the messages it stands for.
_CODES: Final[tuple[tuple[str, str, str], ...]] = (
    (
        "charset_unknown",
        "SpecificCharacterSet names an unknown encoding, or uses code extensions wrongly:"
        " the text was decoded with the default (or first) encoding instead.",
        r"Unknown encoding|Incorrect value for Specific Character Set"
        r"|Value '.*' (for Specific Character Set does not allow|cannot be used as code)",
    ),
    (
        "charset_decode",
        "A text value does not decode with its character set: replacement characters were"
        " stored for the bytes that do not.",
        r"Failed to decode byte string|.* - using encoding ",
    ),
    (
        "vr_mismatch",
        "The transfer syntax says explicit VR but the elements are implicit (or the other"
        " way round): they were read as found.",
        r"Expected (explicit|implicit) VR",
    ),
    (
        "undelimited_sequence",
        "The file ends inside a sequence or item, before its delimiter.",
        r"End of file reached before delimiter",
    ),
    (
        "invalid_value",
        "A value is not valid for its VR (wrong characters, too long, a time with a 60th"
        " second): kept as read.",
        r"(The )?[Vv]alue .*(not valid|exceeds the maximum length|invalid)"
        r"|Invalid value|'datetime\.\w+' doesn't allow",
    ),
    (
        "unknown_tag",
        "An element's tag is in no dictionary and its VR unknown: read as UN.",
        r"Unknown DICOM tag|VR lookup failed",
    ),
    (
        "excess_pixel_data",
        "The pixel data holds more bytes than Rows x Columns x NumberOfFrames need (extra"
        " frames or padding).",
        r"The number of bytes of pixel data is sufficient|.*frames have been found in the"
        r"|The pixel data is \d+ bytes long, which indicates it contains",
    ),
    (
        "bad_number_of_frames",
        "NumberOfFrames is missing, invalid or zero: one frame was assumed.",
        r"A value of .* for \(0028,0008\) 'Number of Frames'",
    ),
    (
        "photometric_mismatch",
        "PhotometricInterpretation disagrees with what the compressed codestream says.",
        r"The \(0028,0004\) 'Photometric Interpretation' value is",
    ),
    (
        "numeric_warning",
        "Converting a value overflowed, divided by zero or met NaN (numpy's RuntimeWarning).",
        r"(overflow|invalid value|divide by zero) encountered",
    ),
    (
        "non_finite_values",
        "The volume holds NaN or infinite voxels (a float image: NIfTI, MINC): stored as"
        " they are, counted in intensity_non_finite and left out of its intensity figures."
        " Training's z-scoring leaves them NaN.",
        r"(?!)",  # found in the values, not raised by a reader
    ),
    (
        "reader_warning",
        "Any other warning a reader raised about the file (the message is not kept: it may"
        " quote a value).",
        r"",
    ),
)

#: Every code a file or volume can carry in its ``warnings`` column, with its meaning.
WARNING_CODES: Final[dict[str, str]] = {code: meaning for code, meaning, _ in _CODES}

_PATTERNS: Final = tuple((code, re.compile(pattern)) for code, _, pattern in _CODES)

#: Modules whose warnings are shown every time while recording (not once per place in
#: the code), so that each file raising one gets its code.
_MODULES: Final = (
    "pydicom", "nibabel", "numpy", "voxlake", "pylibjpeg", "openjpeg", "libjpeg", "rle",
    "gdcm", "SimpleITK",
)  # fmt: skip


def code_for(message: str) -> str:
    """The code of a reader's warning `message` (``reader_warning`` when none fits)."""
    for code, pattern in _PATTERNS:
        if pattern.match(message):
            return code
    return "reader_warning"


class Recording:
    """The codes of the warnings one thread raised while recording, in order."""

    __slots__ = ("codes",)

    def __init__(self) -> None:
        self.codes: list[str] = []

    def since(self, start: int) -> list[str]:
        """The distinct codes recorded after the first `start` ones, sorted."""
        return sorted(set(self.codes[start:]))


_recordings: dict[int, Recording] = {}  # the active recording of each thread, by id
_lock = threading.Lock()
_users = 0  # threads recording now
_saved: Any = None  # the catch_warnings that restores the filters and showwarning
_shown: Any = None  # the showwarning in place before recording started


class _PydicomLog(logging.Filter):
    """pydicom logs each warning it raises as well (``warn_and_log``), and some problems
    only there: on a recording thread those records are recorded as codes and dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        active = _recordings.get(record.thread or 0)
        if active is None or record.levelno < logging.WARNING:
            return True
        active.codes.append(code_for(record.getMessage()))
        return False


_PYDICOM_LOG: Final = _PydicomLog()


def recorded() -> int:
    """How many warnings the calling thread recorded so far (0 when not recording)."""
    active = _recordings.get(threading.get_ident())
    return len(active.codes) if active is not None else 0


def _show(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    active = _recordings.get(threading.get_ident())
    if (
        active is not None
        and issubclass(category, UserWarning | RuntimeWarning)
        and not issubclass(category, VoxlakeWarning)
    ):
        active.codes.append(code_for(str(message)))
        return
    (_shown or warnings.showwarning)(message, category, filename, lineno, file, line)


@contextmanager
def recording() -> Iterator[Recording]:
    """Record the calling thread's warnings (as codes) instead of showing them.

    Threads may record at the same time (a worker with several threads): the first to
    start installs the hook and the filters, the last to finish restores what was there.
    Recording within a recording (a task calling another's code) records the inner
    codes in the outer recording too, when the inner one ends.
    """
    global _users, _saved, _shown
    thread = threading.get_ident()
    outer = _recordings.get(thread)
    active = Recording()
    with _lock:
        if _users == 0:
            saved = warnings.catch_warnings()
            saved.__enter__()
            for module in _MODULES:
                warnings.filterwarnings("always", module=rf"{module}(\.|$)")
            _saved, _shown = saved, warnings.showwarning
            warnings.showwarning = _show
            logging.getLogger("pydicom").addFilter(_PYDICOM_LOG)
        _users += 1
        _recordings[thread] = active
    try:
        yield active
    finally:
        if outer is not None:
            outer.codes.extend(active.codes)
        with _lock:
            if outer is None:
                del _recordings[thread]
            else:
                _recordings[thread] = outer
            _users -= 1
            if _users == 0:
                logging.getLogger("pydicom").removeFilter(_PYDICOM_LOG)
                _saved.__exit__(None, None, None)  # showwarning restored too
                _saved = _shown = None
