"""Errors and warnings raised by voxlake.

Every error derives from :class:`VoxlakeError` and carries a stable ``code``: the value
written to the ``code`` column of the catalog's ``failures`` table. Codes are part of
the public contract (users filter failures by them); never rename one.

Messages must never contain identifying values read from the data (names, IDs, UIDs,
dates): they reach the catalog and logs. Put the *kind* of problem and non-identifying
numbers (sizes, counts, tag numbers) in the message.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AssemblyError",
    "CatalogError",
    "ConfigError",
    "DecodeError",
    "HeaderError",
    "MissingExtraError",
    "NotDicomError",
    "SecretMissingError",
    "SourceError",
    "StoreError",
    "VoxlakeError",
    "VoxlakeWarning",
]


class VoxlakeWarning(UserWarning):
    """Base class for warnings emitted by voxlake."""


class VoxlakeError(Exception):
    """Root of all voxlake errors.

    Parameters
    ----------
    message
        Human-readable, one line, free of identifying values.
    code
        Stable machine-readable code; defaults to the class's ``default_code``.
    hint
        Optional suggestion shown by the CLI under the message.
    **fields
        Structured context (sizes, counts, tag numbers) stored with failure rows.
    """

    default_code: ClassVar[str] = "error"
    stage: ClassVar[str] = "unknown"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        hint: str | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.hint = hint
        self.fields = fields

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross process boundaries (Dask workers); keep keyword fields on unpickle.
        return (_rebuild_error, (type(self), self.message, self.code, self.hint, self.fields))


def _rebuild_error(
    cls: type[VoxlakeError], message: str, code: str, hint: str | None, fields: dict[str, Any]
) -> VoxlakeError:
    return cls(message, code=code, hint=hint, **fields)


class ConfigError(VoxlakeError, ValueError):
    """Invalid configuration or arguments."""

    default_code = "config"
    stage = "config"


class SecretMissingError(ConfigError):
    """No de-identification secret was configured."""

    default_code = "secret_missing"


class MissingExtraError(ConfigError, ImportError):
    """A feature needs a package of one of voxlake's extras that is not installed (the
    hint names the extra)."""

    default_code = "missing_extra"


class SourceError(VoxlakeError, OSError):
    """A source could not be listed or a file could not be read."""

    default_code = "unreadable"
    stage = "read"


class NotDicomError(VoxlakeError, ValueError):
    """The file is neither DICOM nor a supported image format."""

    default_code = "not_dicom"
    stage = "header"


class HeaderError(VoxlakeError, ValueError):
    """The file is DICOM but its header cannot be used."""

    default_code = "bad_header"
    stage = "header"


class AssemblyError(VoxlakeError, ValueError):
    """Instances cannot be assembled into a correct volume."""

    default_code = "assembly"
    stage = "assemble"


class DecodeError(VoxlakeError, ValueError):
    """Pixel data could not be decoded."""

    default_code = "decode"
    stage = "decode"


class StoreError(VoxlakeError, OSError):
    """The volume store could not be written or read."""

    default_code = "store"
    stage = "write"


class CatalogError(VoxlakeError, RuntimeError):
    """The catalog could not be opened, read or committed."""

    default_code = "catalog"
    stage = "catalog"
