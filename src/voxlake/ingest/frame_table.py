"""Turn instance rows into frame rows (driver, pure): one row per 2D frame to be stacked.

A single-frame instance is one frame. An enhanced multi-frame instance contributes one row
per frame, its per-frame values (``frames_json``) overriding the instance's; a Siemens
mosaic contributes one row per tile. After this step the planner treats every frame like a
classic slice, whatever the layout.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from voxlake.errors import AssemblyError

if TYPE_CHECKING:
    from collections.abc import Mapping

    import pandas as pd

__all__ = ["Frame", "explode_frames", "image_kind"]

_IMAGE_KINDS = ("M", "P", "R", "I", "MAGNITUDE", "PHASE", "REAL", "IMAGINARY", "LOCALIZER")
_ERRORS = {
    "bad_functional_groups": "multi-frame functional groups do not match the frame count",
    "mosaic_tiles_unknown": "mosaic without a readable tile count (Siemens CSA header missing)",
    "mosaic_geometry_unknown": "mosaic slice normal or spacing cannot be determined",
    "bad_mosaic": "mosaic size is not a whole multiple of its tile grid",
    "mosaic_order_ambiguous": "mosaic tile order is ambiguous (first tile is not protocol slice 1)",
    "multiframe_geometry_unknown": "multi-frame instance without per-frame geometry",
}


@dataclass
class Frame:
    """One 2D frame with everything assembly needs (units: mm, ms, s/mm^2)."""

    url: str
    content_hash: str
    instance_key: str
    frame: int
    mosaic_grid: int
    layout: str
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    rows: int
    columns: int
    samples: int
    photometric: str
    slope: float
    intercept: float
    philips_scale_slope: float | None
    kind: str
    echo_number: int | None
    echo_time: float | None
    repetition_time: float | None
    temporal_index: int | None
    temporal_position_identifier: int | None
    acquisition_number: int | None
    instance_number: int | None
    trigger_time: float | None
    time: float | None
    b_value: float | None
    b_vector: tuple[float, ...] | None
    dim: tuple[int, ...] | None
    stack: str | None
    series_number: int | None


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _int(value: Any) -> int | None:
    out = _num(value)
    return None if out is None else int(out)


def _tuple(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        return None
    return values


def image_kind(image_type: Any) -> str:
    """Magnitude/phase/real/imaginary/localizer token of ImageType (values 3 and on)."""
    if image_type is None:
        return ""
    try:
        tokens = [str(t).upper() for t in list(image_type)[2:]]
    except TypeError:
        return ""
    for token in tokens:
        if token in _IMAGE_KINDS:
            return token[0] if token in ("MAGNITUDE", "PHASE", "REAL", "IMAGINARY") else token
    return ""


def _base(row: Mapping[str, Any]) -> Frame:
    slope = _num(row.get("rescale_slope"))
    return Frame(
        url=str(row["url"]),
        content_hash=str(row["content_hash"]),
        instance_key=str(row["instance_key"]),
        frame=0,
        mosaic_grid=0,
        layout=str(row.get("layout") or "classic"),
        position=_tuple(row.get("image_position_patient"), 3),
        orientation=_tuple(row.get("image_orientation_patient"), 6),
        pixel_spacing=_tuple(row.get("pixel_spacing"), 2),
        rows=_int(row.get("rows")) or 0,
        columns=_int(row.get("columns")) or 0,
        samples=_int(row.get("samples_per_pixel")) or 1,
        photometric=str(row.get("photometric_interpretation") or "").upper(),
        slope=1.0 if slope is None or slope == 0 else slope,
        intercept=_num(row.get("rescale_intercept")) or 0.0,
        philips_scale_slope=_num(row.get("philips_scale_slope")),
        kind=image_kind(row.get("image_type")),
        echo_number=_int(row.get("echo_numbers")),
        echo_time=_num(row.get("echo_time")),
        repetition_time=_num(row.get("repetition_time")),
        temporal_index=None,
        temporal_position_identifier=_int(row.get("temporal_position_identifier")),
        acquisition_number=_int(row.get("acquisition_number")),
        instance_number=_int(row.get("instance_number")),
        trigger_time=_num(row.get("trigger_time")),
        time=None,
        b_value=_num(row.get("b_value")),
        b_vector=_tuple(row.get("b_vector"), 3),
        dim=None,
        stack=None,
        series_number=_int(row.get("series_number")),
    )


def _override(base: Frame, index: int, values: dict[str, Any]) -> Frame:
    frame = Frame(**{**base.__dict__, "frame": index})
    if "position" in values:
        frame.position = _tuple(values["position"], 3)
    if "orientation" in values:
        frame.orientation = _tuple(values["orientation"], 6)
    if "pixel_spacing" in values:
        frame.pixel_spacing = _tuple(values["pixel_spacing"], 2)
    if "slope" in values:
        slope = _num(values["slope"])
        frame.slope = 1.0 if slope is None or slope == 0 else slope
    if "intercept" in values:
        frame.intercept = _num(values["intercept"]) or 0.0
    for name in ("philips_scale_slope", "echo_time", "repetition_time", "trigger_time"):
        if name in values:
            setattr(frame, name, _num(values[name]))
    for name in ("b_value", "time"):
        if name in values:
            setattr(frame, name, _num(values[name]))
    if "b_vector" in values:
        frame.b_vector = _tuple(values["b_vector"], 3)
    if "kind" in values:
        frame.kind = str(values["kind"])
    if "temporal_index" in values:
        frame.temporal_index = _int(values["temporal_index"])
    if "acquisition" in values:
        frame.acquisition_number = _int(values["acquisition"])
    if values.get("stack") is not None:
        frame.stack = str(values["stack"])
    if values.get("dim") is not None:
        frame.dim = tuple(int(v) for v in values["dim"])
    return frame


#: The ``instances`` columns :func:`explode_frames` reads.
_READ_COLUMNS: Final = (
    "url", "content_hash", "instance_key", "layout", "image_position_patient",
    "image_orientation_patient", "pixel_spacing", "rows", "columns", "samples_per_pixel",
    "photometric_interpretation", "rescale_slope", "rescale_intercept",
    "philips_scale_slope", "image_type", "echo_numbers", "echo_time", "repetition_time",
    "temporal_position_identifier", "acquisition_number", "instance_number",
    "trigger_time", "b_value", "b_vector", "series_number", "frames_json",
)  # fmt: skip


def explode_frames(group: pd.DataFrame) -> list[Frame]:
    """Frames of every instance in ``group`` (one series), in instance then frame order.

    Raises :class:`AssemblyError` when an instance's frames cannot be described (its
    header pass recorded why in ``frames_json``).
    """
    frames: list[Frame] = []
    # Plain dicts: a Series per row (iterrows) cost more than the rest of this loop, and
    # to_dict("records") boxes value by value (3x the column-wise tolist()).
    # Only the columns read here: the others (header_json above all) cost a Python
    # object per value to list.
    columns = [name for name in _READ_COLUMNS if name in group.columns]
    records = zip(*(group[name].tolist() for name in columns), strict=True)
    for row in (dict(zip(columns, values, strict=True)) for values in records):
        base = _base(row)
        text = row.get("frames_json")
        if not isinstance(text, str) or not text:
            frames.append(base)
            continue
        info = json.loads(text)
        error = info.get("error")
        if error:
            raise AssemblyError(_ERRORS.get(error, "frames cannot be described"), code=error)
        mosaic = info.get("mosaic")
        if mosaic:
            base.mosaic_grid = int(mosaic["grid"])
            base.rows = int(mosaic["tile_rows"])
            base.columns = int(mosaic["tile_columns"])
        frames.extend(_override(base, i, values) for i, values in enumerate(info["frames"]))
    return frames
