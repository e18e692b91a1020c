"""HTML summary of a catalog for notebooks (``Catalog._repr_html_``)."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from voxlake.catalog.query import Catalog

__all__ = ["summary_html"]


def summary_html(catalog: Catalog) -> str:
    """Version, counts per table, volumes per modality, failures per code, recent runs."""
    info = catalog.summary()
    when = f"{info['committed_at']:%Y-%m-%d %H:%M:%S} UTC" if info["committed_at"] else "-"
    counts = {
        "instances": f"{info['instances']:,}",
        "volumes": f"{info['volumes']:,} ({info['volume_bytes'] / 1e9:.2f} GB uncompressed)",
        "failures": f"{info['failures']:,}",
        "runs": f"{info['runs']:,}",
        "labels": f"{info['labels']:,}",
    }
    parts = [
        "<div><b>voxlake catalog</b> "
        f"<code>{html.escape(catalog.url)}</code>, version {catalog.version} ({when})</div>",
        _html_table(counts, ("table", "rows")),
    ]
    if info["volumes_by_modality"]:
        parts.append(_html_table(info["volumes_by_modality"], ("modality", "volumes")))
    if info["failures_by_code"]:
        parts.append(_html_table(info["failures_by_code"], ("failure code", "count")))
    if info["warnings_by_code"]:
        parts.append(_html_table(info["warnings_by_code"], ("warning code", "files")))
    runs = catalog.read("runs", columns=["run_id", "status", "started_at", "volumes_written"])
    if len(runs):
        runs = runs.sort_values("started_at").tail(5)
        recent = {r.run_id: f"{r.status}, {r.volumes_written} volumes" for r in runs.itertuples()}
        parts.append(_html_table(recent, ("recent run", "result")))
    style = "display:flex;gap:2em;align-items:flex-start"
    return f"{parts[0]}<div style='{style}'>{''.join(parts[1:])}</div>"


def _html_table(rows: Mapping[Any, Any], header: tuple[str, str]) -> str:
    cells = "".join(
        f"<tr><td style='text-align:left'>{html.escape(str(k))}</td>"
        f"<td style='text-align:right'>{html.escape(str(v))}</td></tr>"
        for k, v in rows.items()
    )
    head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>"
