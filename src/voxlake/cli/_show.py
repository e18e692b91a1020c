"""``voxlake show`` (pictures of volumes) and ``voxlake docs`` (reference pages)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.text import Text

from voxlake.cli._app import app, console, docs_app, out, write_reference
from voxlake.errors import ConfigError, VoxlakeError

if TYPE_CHECKING:
    from voxlake.viz import VolumeView


def _parse_window(text: str | None) -> str | tuple[float, float] | None:
    if text is None or "," not in text:
        return text
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise VoxlakeError(
            f"cannot read window {text!r}", code="bad_window", hint="e.g. --window 40,400"
        ) from exc
    return level, width


def _check_time_point(view: VolumeView, t: int) -> None:
    """A volume without time points has only ``--t 0`` (4D ranges are checked when drawn)."""
    timed = view.array.ndim == 4 and not view.colour
    if not timed and t != 0:
        kind = "a colour" if view.colour else "a 3D"
        raise ConfigError(
            f"time point {t} out of range: {kind} volume has no time axis",
            code="bad_time_point",
            hint="leave out --t (it is for 4D volumes)",
        )


@app.command()
def show(
    catalog: Annotated[str, typer.Argument(help="Catalog root.")],
    volume_id: Annotated[
        Optional[str],  # noqa: UP045
        typer.Argument(help="Volume id or a unique prefix (6+ characters); default: the first."),
    ] = None,
    out_file: Annotated[
        Path,
        typer.Option(
            "--out", help="Image to write; its suffix names the format: png, jpg, pdf, svg..."
        ),
    ] = Path("view.png"),
    window: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="ct-soft, ct-lung, ct-bone, ct-brain, auto, or LEVEL,WIDTH"
            " (default: ct-soft for CT in HU, auto otherwise)."
        ),
    ] = None,
    montage: Annotated[
        bool, typer.Option("--montage", help="Draw an axial slice montage instead.")
    ] = False,
    t: Annotated[int, typer.Option("--t", help="Time point of a 4D volume.")] = 0,
    version: Annotated[Optional[int], typer.Option(help="Catalog version to read.")] = None,  # noqa: UP045
    store: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Volume store root (default: the catalog row's store_url)."),
    ] = None,
    dpi: Annotated[
        int, typer.Option(min=1, help="Raster image resolution (12-inch-wide figure).")
    ] = 100,
) -> None:
    """Draw a volume: axial, coronal and sagittal planes through its centre, or a montage.

    Panels follow the radiological convention (patient's right on the image's left,
    superior up) with physical aspect ratios from the voxel spacing.

    Examples: `voxlake show out/catalog --out view.png`,
    `voxlake show out/catalog --window ct-lung --montage --out montage.png`
    """
    from voxlake.viz import image_format, load_volume, plot_montage, plot_triplanar, save_figure

    image_format(out_file)  # a suffix it cannot write is refused before any reading
    with console.status("reading the volume..."):
        view = load_volume(catalog, volume_id, version=version, store=store)
        _check_time_point(view, t)
        parsed = _parse_window(window)
        figure = (
            plot_montage(view, window=parsed, t=t)
            if montage
            else plot_triplanar(view, window=parsed, t=t)
        )
        save_figure(figure, out_file, dpi=dpi)
    if volume_id is None:
        console.print(f"no VOLUME_ID given: showing the first volume, {view.volume_id}")
    out.print(Text(f"wrote {out_file} ({view.title})"))


# --------------------------------------------------------------------------- docs
@docs_app.command("cli")
def docs_cli(
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the Markdown.")] = Path(
        "docs/cli.md"
    ),
) -> None:
    """Regenerate the command-line reference from the typer app.

    Example: `voxlake docs cli --out docs/cli.md`
    """
    from voxlake._docgen import render_cli_markdown

    write_reference(out_file, render_cli_markdown())


@docs_app.command("config")
def docs_config(
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the Markdown.")] = Path(
        "docs/configuration.md"
    ),
) -> None:
    """Regenerate the configuration reference from the configuration dataclasses.

    Example: `voxlake docs config --out docs/configuration.md`
    """
    from voxlake._docgen import render_config_markdown

    write_reference(out_file, render_config_markdown())
