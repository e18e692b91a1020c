"""The ``voxlake`` command line (the only place that sets up logging and draws progress).

Errors print as one line plus a hint; ``voxlake --debug ...`` shows the traceback. One
module per command group; importing them registers their commands on :data:`app`, in the
order ``voxlake --help`` lists them.
"""

from __future__ import annotations

from voxlake.cli import _catalog, _ingest, _show, _train  # noqa: F401  (registers commands)
from voxlake.cli._app import app, main

__all__ = ["app", "main"]
