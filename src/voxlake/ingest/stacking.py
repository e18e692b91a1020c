"""Stack the frames of one split part into a (t, z, y, x) volume (driver, pure).

Frames are sorted along the slice normal; equal positions (within 0.01 mm) form one slice
position; positions repeated n times make n timepoints, ordered by temporal keys. The
result is one :class:`Stack` (plus an equidistant resampled one when configured and the
spacing is irregular), or an :class:`~voxlake.errors.AssemblyError` with a precise code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from voxlake.errors import AssemblyError
from voxlake.ingest.geometry import (
    POSITION_TOL_MM,
    SliceStack,
    affine_from_stack,
    check_stack,
    image_components,
    orientation_is_valid,
    slice_normal,
)

if TYPE_CHECKING:
    import pandas as pd

    from voxlake.ingest.frame_table import Frame
    from voxlake.ingest.series import SliceRef

__all__ = ["COLOUR_PHOTOMETRIC", "Stack", "colour_kind", "output_dtype", "plan_stack"]

#: Photometric interpretations stored as RGB channels. pydicom converts YBR_FULL and
#: YBR_FULL_422 to RGB when decoding (JPEG 2000 codecs already return RGB for YBR_ICT and
#: YBR_RCT); PALETTE COLOR is expanded through its lookup table.
COLOUR_PHOTOMETRIC = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")


@dataclass(frozen=True)
class Stack:
    """A planned volume before it gets its identity (see ``VolumePlan``)."""

    shape: tuple[int, ...]
    slices: tuple[SliceRef, ...]
    affine: tuple[float, ...]
    spacing: tuple[float, float, float]
    dtype: str
    wider_dtype: str | None
    units: str
    bits_stored: int
    pixel_representation: int
    geometry: dict[str, float]
    columns: dict[str, Any] = field(default_factory=dict)
    layout: str = "classic"
    resample: tuple[tuple[float, ...], float] | None = None
    resampled: bool = False
    axes: str = "zyx"


def _num(value: Any, default: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) else default


def output_dtype(
    slopes: np.ndarray, intercepts: np.ndarray, *, bits: int, signed: bool
) -> tuple[str, str | None]:
    """Stored dtype and the wider dtype to fall back to if real values overflow it.

    Exact integer rescales (CT: slope 1, intercept -1024) are stored as int16 HU even when
    the declared BitsStored range could overflow int16 after rescaling: real values fit;
    the worker widens to int32 if a slab proves otherwise. Inexact rescales give float32.
    """
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    with np.errstate(over="ignore"):  # a slope like 1e308 gives inf: float32 at worst
        ends = np.concatenate([slopes * low + intercepts, slopes * high + intercepts])
    integral = bool(
        np.all(np.abs(slopes - np.round(slopes)) < 1e-6)
        and np.all(np.abs(intercepts - np.round(intercepts)) < 1e-6)
    )
    if not integral:
        return "float32", None
    identity = bool(np.all(slopes == 1) and np.all(intercepts == 0))
    if identity and not signed and bits <= 8:
        return "uint8", None
    info16 = np.iinfo(np.int16)
    if ends.min() >= info16.min and ends.max() <= info16.max:
        return "int16", None
    if identity and not signed and bits <= 16:
        return "uint16", None
    return "int16", "int32"


def colour_kind(samples: int, photometric: str) -> str:
    """``""`` for greyscale, ``"rgb"`` or ``"palette"`` for a stored colour series.

    Raises :class:`AssemblyError` (``color_unsupported``) for any other colour model.
    """
    if samples == 1 and photometric == "PALETTE COLOR":
        return "palette"
    if samples == 1:
        return ""
    if samples == 3 and photometric in COLOUR_PHOTOMETRIC:
        return "rgb"
    raise AssemblyError(
        f"colour model {photometric or '?'} with {samples} samples per pixel is not stored",
        code="color_unsupported",
    )


def _key(value: Any) -> tuple[bool, Any]:
    return (value is None, 0 if value is None else value)


def _temporal_order(frames: list[Frame]) -> list[tuple[Any, ...]]:
    """Sort keys ordering the frames at one position in time."""
    dims = {len(f.dim) if f.dim else 0 for f in frames}
    use_dim = len(dims) == 1 and 0 not in dims
    return [
        (
            _key(f.temporal_position_identifier),
            _key(f.temporal_index),
            f.dim if use_dim else (),
            _key(f.trigger_time),
            _key(f.acquisition_number),
            _key(f.instance_number),
            _key(f.time),
            f.frame,
        )
        for f in frames
    ]


def _timepoint_identity(frame: Frame) -> tuple[Any, ...]:
    vector = tuple(round(v, 4) for v in frame.b_vector) if frame.b_vector else None
    b_value = None if frame.b_value is None else round(frame.b_value, 1)
    return (frame.temporal_position_identifier, frame.temporal_index, b_value, vector)


def _scaling(frames: list[Frame], precise: bool) -> tuple[np.ndarray, np.ndarray, str]:
    slopes = np.array([f.slope for f in frames], dtype=float)
    intercepts = np.array([f.intercept for f in frames], dtype=float)
    how = "none" if np.all(slopes == 1) and np.all(intercepts == 0) else "rescale"
    if precise:
        scale = np.array([f.philips_scale_slope or 0.0 for f in frames], dtype=float)
        if np.all(scale > 0):
            # Philips floating point: FP = DV / (RS * SS), DV = PV * RS + RI.
            intercepts = intercepts / (slopes * scale)
            slopes = 1.0 / scale
            how = "philips_precise"
    return slopes, intercepts, how


def _diffusion_columns(firsts: list[Frame], iop: tuple[float, ...]) -> dict[str, Any]:
    if all(f.b_value is None for f in firsts):
        return {}
    patient: list[float] = []
    image: list[float] = []
    for f in firsts:
        if f.b_vector is not None:
            vec = np.asarray(f.b_vector, dtype=float)
        elif f.b_value is not None and f.b_value <= 0:
            vec = np.zeros(3)
        else:
            vec = np.full(3, np.nan)
        patient.extend(float(v) for v in vec)
        image.extend(float(v) for v in image_components(vec, iop))
    return {
        "b_values": [float("nan") if f.b_value is None else f.b_value for f in firsts],
        "b_vectors_patient": patient,
        "b_vectors_image": image,
    }


def plan_stack(
    frames: list[Frame],
    *,
    tolerance: float,
    philips_precise: bool,
    resample_irregular: bool,
    first: pd.Series,
) -> list[Stack]:
    """Stack one part's frames, or raise :class:`AssemblyError` with a precise code."""
    from voxlake.ingest.series import SliceRef

    head = frames[0]
    colour = colour_kind(head.samples, head.photometric)
    iop, ps = head.orientation, head.pixel_spacing
    if iop is None or any(f.position is None for f in frames):
        raise AssemblyError("image position or orientation missing", code="missing_geometry")
    if ps is None or min(ps) <= 0:
        raise AssemblyError("pixel spacing missing, zero or not finite", code="bad_pixel_spacing")
    if not orientation_is_valid(iop):
        raise AssemblyError("image orientation vectors are not orthonormal", code="bad_orientation")
    if len(frames) < 2:
        raise AssemblyError("a single slice is not a volume", code="single_slice")
    normal = slice_normal(iop)
    along = np.array([np.asarray(f.position) @ normal for f in frames])
    order = np.argsort(along, kind="stable")
    sorted_along = along[order]
    cluster_of_sorted = np.concatenate([[0], np.cumsum(np.diff(sorted_along) > POSITION_TOL_MM)])
    clusters: list[list[Frame]] = [[] for _ in range(int(cluster_of_sorted[-1]) + 1)]
    for idx, c in zip(order, cluster_of_sorted, strict=True):
        clusters[int(c)].append(frames[int(idx)])
    counts = {len(c) for c in clusters}
    if len(counts) != 1:
        raise AssemblyError("slice positions repeat unevenly", code="duplicate_position")
    n_t = counts.pop()
    if len(clusters) < 2:
        raise AssemblyError("all frames at one position: not a volume", code="single_slice")
    ordered = []
    for members in clusters:
        keys = _temporal_order(members)
        ordered.append([m for _, m in sorted(zip(keys, members, strict=True), key=lambda p: p[0])])
    for t in range(n_t):
        if len({_timepoint_identity(c[t]) for c in ordered}) > 1:
            raise AssemblyError(
                "timepoints cannot be ordered consistently across slice positions",
                code="ambiguous_timepoints",
            )
    positions = np.array([c[0].position for c in ordered], dtype=float)
    stack = SliceStack(positions, positions @ normal)
    check = check_stack(stack, normal, tolerance=tolerance)
    resample: tuple[tuple[float, ...], float] | None = None
    if colour and n_t > 1:
        raise AssemblyError(
            "4D colour series (colour and time) are not stored", code="color_unsupported"
        )
    if check.code == "irregular_spacing" and resample_irregular and not colour:
        dist = np.concatenate([[0.0], np.cumsum(check.steps)])
        target = float(check.steps.min())
        resample = (tuple(float(d) for d in dist), target)
    elif check.code:
        raise AssemblyError(check.message, code=check.code)
    timeline = [c[t] for t in range(n_t) for c in ordered]  # t-major, z ascending
    slopes, intercepts, how = _scaling(timeline, philips_precise)
    bits = int(_num(first.get("bits_stored"), _num(first.get("bits_allocated"), 16)))
    signed = int(_num(first.get("pixel_representation"), 0)) == 1
    dtype, wider = output_dtype(slopes, intercepts, bits=bits, signed=signed)
    if colour:
        # Colour values are not rescaled (PS3.3 C.11.1 applies to greyscale). Palette
        # colour is stored as uint16: the LUT's entries are 8 or 16 bits, known only
        # from its data, and uint16 holds either exactly.
        slopes, intercepts, how = np.ones(len(timeline)), np.zeros(len(timeline)), "none"
        allocated = int(_num(first.get("bits_allocated"), 8))
        dtype = "uint8" if colour == "rgb" and allocated <= 8 else "uint16"
        wider = None
    if resample is not None and dtype != "float32":
        dtype, wider = "float32", None  # interpolated values are not integers
    slices = tuple(
        SliceRef(
            url=f.url,
            frame=f.frame,
            slope=float(s),
            intercept=float(i),
            content_hash=f.content_hash,
            instance_key=f.instance_key,
            mosaic_grid=f.mosaic_grid,
        )
        for f, s, i in zip(timeline, slopes, intercepts, strict=True)
    )
    if resample is None:
        n_z = len(ordered)
    else:
        n_z = math.floor(float(check.steps.sum()) / resample[1] + 1e-6) + 1
    direction = check.step_vector / np.linalg.norm(check.step_vector)
    step_vector = check.step_vector if resample is None else direction * resample[1]
    affine = affine_from_stack(iop, (ps[0], ps[1]), positions[0], step_vector)
    rows, cols = head.rows, head.columns
    shape: tuple[int, ...] = (n_z, rows, cols) if n_t == 1 else (n_t, n_z, rows, cols)
    axes = "zyx" if n_t == 1 else "tzyx"
    if colour:
        shape, axes = (3, n_z, rows, cols), "czyx"
    modality = str(first.get("modality") or "")
    rescale_type = str(first.get("rescale_type") or "")
    units = "HU" if modality == "CT" or rescale_type == "HU" else rescale_type
    if how == "philips_precise":
        units = ""
    firsts = [ordered[0][t] for t in range(n_t)]
    columns: dict[str, Any] = {
        "layout": head.layout,
        "value_scaling": how,
        "source_frames": [s.frame for s in slices],
        "repetition_time": next(
            (f.repetition_time for f in frames if f.repetition_time is not None), None
        ),
        "echo_times": [float("nan") if f.echo_time is None else f.echo_time for f in firsts],
        "resampled": resample is not None,
        **_diffusion_columns(firsts, iop),
    }
    return [
        Stack(
            shape=shape,
            slices=slices,
            affine=tuple(float(v) for v in affine.ravel()),
            spacing=(float(np.linalg.norm(step_vector)), ps[0], ps[1]),
            dtype=dtype,
            wider_dtype=wider,
            units=units,
            bits_stored=bits,
            pixel_representation=int(signed),
            geometry={
                "slice_spacing_mean": float(np.mean(check.steps)),
                "slice_spacing_max_dev": check.max_deviation,
                "gantry_tilt_deg": check.tilt_deg,
            },
            columns=columns,
            layout=head.layout,
            resample=resample,
            resampled=resample is not None,
            axes=axes,
        )
    ]
