"""The typer apps, shared options and the entry point with its one-line errors."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from voxlake import __version__
from voxlake.errors import VoxlakeError

__all__ = [
    "Terminated",
    "app",
    "catalog_app",
    "console",
    "docs_app",
    "interrupted",
    "main",
    "out",
]

console = Console(stderr=True)
out = Console()

app = typer.Typer(
    name="voxlake",
    help="Turn imaging archives into training data: ingest, catalog, stream, train.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    add_completion=False,
)
catalog_app = typer.Typer(
    help="Query and maintain a catalog.", no_args_is_help=True, rich_markup_mode="markdown"
)
app.add_typer(catalog_app, name="catalog")
docs_app = typer.Typer(
    help="Regenerate the reference pages in docs/ from the code.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(docs_app, name="docs")


def _version(value: bool) -> None:
    if value:
        out.print(f"voxlake {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show info logs.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """voxlake: DICOM / NIfTI archives -> Delta catalog + OME-Zarr store -> PyTorch."""
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if level > logging.INFO:
        # distributed sets its loggers to INFO when imported (scheduler and worker chatter
        # at every start and stop); read by dask's config, so workers inherit it too.
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")


def write_reference(out_file: Path, text: str) -> None:
    """Write a generated reference page (creating its folder) and say so."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(text)
    out.print(f"wrote {escape(str(out_file))}")


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise VoxlakeError(
            "storage options must be a JSON object", code="config", hint="e.g. '{\"anon\": true}'"
        ) from exc
    if not isinstance(value, dict):
        raise VoxlakeError("storage options must be a JSON object", code="config")
    return value


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: one-line errors with a hint unless --debug."""
    global _said_interrupted, _terminated
    args = list(sys.argv[1:] if argv is None else argv)
    _said_interrupted = _terminated = False
    with _sigterm_stops_like_ctrl_c():
        code = _run(args)
    if code:
        sys.exit(code)


def _run(args: list[str]) -> int:
    try:
        # Outside standalone mode, typer *returns* the code of a typer.Exit raised by a
        # command (and of Ctrl-C, which it turns into Exit(130)) instead of raising it.
        code = app(args, standalone_mode=False)
    except VoxlakeError as exc:
        if "--debug" in args:
            raise
        # soft_wrap: one line whatever the terminal width (paths stay copyable).
        message = f"[red]error[/red] {escape(f'[{exc.code}]')} {escape(exc.message)}"
        console.print(message, soft_wrap=True)
        if exc.hint:
            console.print(f"hint: {escape(exc.hint)}", soft_wrap=True)
        return 2
    except typer.Exit as exc:
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        code = _INTERRUPTED
    except Exception as exc:
        import click

        # typer >= 0.20 vendors click (typer._click): its usage errors are not click's.
        exit_code = getattr(exc, "exit_code", None)
        usage_error = isinstance(exc, click.exceptions.ClickException) or (
            callable(getattr(exc, "show", None)) and isinstance(exit_code, int)
        )
        if usage_error:
            exc.show()  # type: ignore[attr-defined]
            return int(exc.exit_code)  # type: ignore[attr-defined]
        if "--debug" in args:
            raise
        console.print(f"[red]error[/red] {type(exc).__name__}: {escape(str(exc))}", soft_wrap=True)
        console.print("hint: run again with --debug for the traceback")
        return 1
    code = code if isinstance(code, int) else 0
    if code in (_INTERRUPTED, _TERMINATED):
        # typer turns any KeyboardInterrupt (Terminated too) into Exit(130).
        code = _TERMINATED if _terminated else _INTERRUPTED
        if not _said_interrupted:
            console.print(_stopped_by())
    return code


#: The exit codes of a command stopped by Ctrl-C (128 + SIGINT) and by SIGTERM (128 + 15),
#: as shells report them.
_INTERRUPTED = 130
_TERMINATED = 143
_said_interrupted = False
_terminated = False


class Terminated(KeyboardInterrupt):
    """SIGTERM stopped the command: raised where Ctrl-C raises ``KeyboardInterrupt``.

    ``docker stop``, Kubernetes, systemd and batch schedulers at their time limit send
    SIGTERM to the main process, then SIGKILL after a grace period. By default SIGTERM
    killed voxlake at once, leaving its run ``running`` as after ``kill -9``; as a
    ``KeyboardInterrupt`` every command stops as it does on Ctrl-C (an ingest commits its
    run as ``interrupted``, a training stops its ranks) and exits 143.
    """


@contextlib.contextmanager
def _sigterm_stops_like_ctrl_c() -> Iterator[None]:
    # Only the main thread sets handlers; and one set by whoever started us (SIG_IGN, or an
    # embedding program's own) is theirs to keep.
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def on_sigterm(signum: int, frame: object) -> None:
        global _terminated
        # A second SIGTERM ends the process at once, as it would have without this.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _terminated = True
        raise Terminated("stopped by SIGTERM")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stopped_by() -> str:
    return "terminated (SIGTERM)" if _terminated else "interrupted"


def interrupted(hint: str) -> typer.Exit:
    """Say that Ctrl-C (or SIGTERM) stopped the command and what to do next; returns the
    exit to raise."""
    global _said_interrupted
    console.print(_stopped_by())
    console.print(f"hint: {escape(hint)}", soft_wrap=True)
    _said_interrupted = True
    return typer.Exit(_TERMINATED if _terminated else _INTERRUPTED)
