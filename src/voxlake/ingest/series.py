"""Series assembly (driver, pure): group instance rows into correct volume plans.

Rules (``docs/series-assembly.md`` explains them with every failure code):

1. Group by ``series_key`` (keyed SeriesInstanceUID). Identical copies of one instance
   (same SOP instance, same bytes) count once; the same SOP instance with different bytes
   makes the series ambiguous (``duplicate_sop_instance``).
2. Split where one volume would be wrong: image orientation, rows/columns, pixel spacing,
   echo number, image kind (magnitude/phase/real/imaginary/localizer), samples per pixel.
   Each part records what distinguished it in ``split_key`` / ``split_reason``.
3. Sort along the slice normal ``n = row x col`` by ``ImagePositionPatient . n``, never by
   InstanceNumber.
4. Positions repeated the same number of times make a 4D (t, z, y, x) volume, ordered in t
   by temporal position, acquisition number, then instance number; unequal repeats are
   ``duplicate_position``.
5. Spacing must be uniform within ``spacing_tolerance``: a gap that is a whole multiple of
   the usual step is ``missing_slice``, anything else ``irregular_spacing``.
6. The affine is exact (a tilted gantry gives a sheared affine, with the tilt recorded):
   column 0 = row direction x column spacing, column 1 = column direction x row spacing,
   column 2 = the mean step between sorted slices, column 3 = the first slice position,
   then LPS -> RAS. This equals what nibabel reports for dcm2niix's NIfTI.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from voxlake.errors import AssemblyError
from voxlake.keys import volume_id_for

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["LAYOUT_VERSION", "SliceRef", "VolumePlan", "plan_volumes"]

#: Bump when the stored representation changes, so revisions (and volumes) are rebuilt.
LAYOUT_VERSION = 1

_IMAGE_KINDS = ("M", "P", "R", "I", "MAGNITUDE", "PHASE", "REAL", "IMAGINARY", "LOCALIZER")
_POSITION_TOL_MM = 0.01
_META_COLUMNS = (
    "modality",
    "manufacturer",
    "manufacturer_model_name",
    "body_part_examined",
    "study_description",
    "series_description",
    "protocol_name",
    "series_number",
    "study_date",
    "patient_age",
    "patient_sex",
)


@dataclass(frozen=True)
class SliceRef:
    """One 2D frame of a volume: where its pixels are and how to rescale them."""

    url: str
    frame: int
    slope: float
    intercept: float
    content_hash: str
    instance_key: str


@dataclass(frozen=True)
class VolumePlan:
    """Everything a worker needs to build one volume, decided on the driver."""

    volume_id: str
    revision: str
    series_key: str
    study_key: str
    patient_key: str
    split_key: str
    split_reason: str
    shape: tuple[int, ...]
    slices: tuple[SliceRef, ...]  # t-major, then z in spatial order
    affine: tuple[float, ...]  # 16 values, row-major, RAS
    spacing: tuple[float, float, float]  # (z, y, x) mm
    dtype: str
    wider_dtype: str | None
    units: str
    rows: int
    columns: int
    bits_stored: int
    pixel_representation: int
    geometry: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def nvoxels(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class PlanFailure:
    """A series (or part of one) that cannot be assembled into a correct volume."""

    subject: str
    error: AssemblyError


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


def _image_kind(image_type: Any) -> str:
    if image_type is None:
        return ""
    for token in list(image_type)[2:]:
        if str(token).upper() in _IMAGE_KINDS:
            return str(token).upper()
    return ""


def _num(value: Any, default: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) else default


def _signature(row: pd.Series) -> dict[str, Any]:
    iop = _tuple(row.get("image_orientation_patient"), 6)
    ps = _tuple(row.get("pixel_spacing"), 2)
    return {
        "orientation": tuple(round(v, 3) for v in iop) if iop else None,
        "matrix": (int(_num(row.get("rows"), 0)), int(_num(row.get("columns"), 0))),
        "pixel_spacing": tuple(round(v, 4) for v in ps) if ps else None,
        "echo": int(_num(row.get("echo_numbers"), 0)),
        "image_kind": _image_kind(row.get("image_type")),
        "samples": int(_num(row.get("samples_per_pixel"), 1)),
    }


def _split(group: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """Split a series into parts with one geometry each: (split_key, reason, rows)."""
    signatures = [json.dumps(_signature(row), sort_keys=True) for _, row in group.iterrows()]
    group = group.assign(_sig=signatures)
    parts = sorted(group.groupby("_sig", sort=True), key=lambda kv: str(kv[0]))
    if len(parts) == 1:
        return [("", "", group)]
    decoded = [json.loads(str(sig)) for sig, _ in parts]
    differing = sorted(k for k in decoded[0] if len({json.dumps(d[k]) for d in decoded}) > 1)
    reason = ",".join(differing)
    out = []
    for (sig, rows), sigdict in zip(parts, decoded, strict=True):
        key = ";".join(f"{k}={json.dumps(sigdict[k])}" for k in differing)
        out.append((key, reason, rows.drop(columns="_sig")))
        del sig
    return out


def _output_dtype(rows: pd.DataFrame) -> tuple[str, str | None]:
    """Stored dtype and the wider dtype to fall back to if real values overflow it.

    Exact integer rescales (CT: slope 1, intercept -1024) are stored as int16 HU even when
    the declared BitsStored range could overflow int16 after rescaling: real values fit;
    the worker widens to int32 if a slab proves otherwise. Inexact rescales give float32.
    """
    bits = int(_num(rows["bits_stored"].iloc[0], _num(rows["bits_allocated"].iloc[0], 16)))
    signed = int(_num(rows["pixel_representation"].iloc[0], 0)) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slopes = rows["_slope"].to_numpy(dtype=float)
    intercepts = rows["_intercept"].to_numpy(dtype=float)
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


def _fail(subject: str, code: str, message: str) -> PlanFailure:
    return PlanFailure(subject, AssemblyError(message, code=code))


def _plan_part(
    series_key: str, split_key: str, reason: str, rows: pd.DataFrame, *, tolerance: float
) -> VolumePlan | PlanFailure:
    subject = series_key if not split_key else f"{series_key}#{split_key}"
    first = rows.iloc[0]
    if int(_num(first.get("samples_per_pixel"), 1)) != 1:
        return _fail(subject, "color_unsupported", "colour (multi-sample) images are not stored")
    frames = rows["number_of_frames"].fillna(1).astype(int)
    if (frames > 1).any():
        return _fail(
            subject, "multiframe_unsupported", "multi-frame instances are not assembled yet"
        )
    iop = _tuple(first.get("image_orientation_patient"), 6)
    ps = _tuple(first.get("pixel_spacing"), 2)
    if iop is None or rows["image_position_patient"].map(lambda v: _tuple(v, 3) is None).any():
        return _fail(subject, "missing_geometry", "image position or orientation missing")
    if ps is None or min(ps) <= 0:
        return _fail(subject, "bad_pixel_spacing", "pixel spacing missing, zero or not finite")
    row_dir, col_dir = np.array(iop[:3]), np.array(iop[3:])
    if (
        abs(np.linalg.norm(row_dir) - 1) > 1e-3
        or abs(np.linalg.norm(col_dir) - 1) > 1e-3
        or abs(float(row_dir @ col_dir)) > 1e-3
    ):
        return _fail(subject, "bad_orientation", "image orientation vectors are not orthonormal")
    if len(rows) < 2:
        return _fail(subject, "single_slice", "a single slice is not a volume")
    normal = np.cross(row_dir, col_dir)
    positions = np.array([_tuple(v, 3) for v in rows["image_position_patient"]])
    along = positions @ normal
    rows = rows.assign(_along=along).sort_values("_along", kind="stable")
    along_sorted = rows["_along"].to_numpy()
    cluster = np.concatenate([[0], np.cumsum(np.diff(along_sorted) > _POSITION_TOL_MM)])
    rows = rows.assign(_cluster=cluster).sort_values(
        ["_cluster", "temporal_position_identifier", "acquisition_number", "instance_number"],
        na_position="first",
        kind="stable",
    )
    counts = np.bincount(cluster)
    n_pos, n_t = len(counts), int(counts[0])
    if not np.all(counts == n_t):
        return _fail(subject, "duplicate_position", "slice positions repeat unevenly")
    if n_pos < 2:
        return _fail(subject, "single_slice", "all frames at one position: not a volume")
    # Order: t-major. Within a position, rows are already ordered by temporal keys.
    rows = rows.assign(_z=cluster, _t=np.tile(np.arange(n_t), n_pos))
    rows = rows.sort_values(["_t", "_z"], kind="stable")
    first_t = rows[rows["_t"] == 0]
    pos0 = np.array([_tuple(v, 3) for v in first_t["image_position_patient"]])
    steps = np.diff(pos0 @ normal)
    step = float(np.median(steps))
    deviation = np.abs(steps - step)
    if np.any(deviation > tolerance * abs(step) + 1e-3):
        ratios = steps / step
        whole = np.abs(ratios - np.round(ratios)) < tolerance
        if np.any((np.round(ratios) >= 2) & whole) and np.all(whole):
            return _fail(subject, "missing_slice", "a gap of whole slice steps: missing slice(s)")
        return _fail(subject, "irregular_spacing", "slice spacing is not uniform")
    step_vec = (pos0[-1] - pos0[0]) / (n_pos - 1)
    cos_tilt = float(abs(step_vec @ normal) / np.linalg.norm(step_vec))
    tilt = math.degrees(math.acos(min(1.0, cos_tilt)))
    lps = np.eye(4)
    lps[:3, 0] = row_dir * ps[1]
    lps[:3, 1] = col_dir * ps[0]
    lps[:3, 2] = step_vec
    lps[:3, 3] = pos0[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    rows = rows.assign(
        _slope=rows["rescale_slope"].map(lambda v: _num(v, 1.0)),
        _intercept=rows["rescale_intercept"].map(lambda v: _num(v, 0.0)),
    )
    dtype, wider = _output_dtype(rows)
    n_rows, n_cols = int(first["rows"]), int(first["columns"])
    shape: tuple[int, ...] = (n_pos, n_rows, n_cols) if n_t == 1 else (n_t, n_pos, n_rows, n_cols)
    slices = tuple(
        SliceRef(
            url=str(r["url"]),
            frame=0,
            slope=float(r["_slope"]),
            intercept=float(r["_intercept"]),
            content_hash=str(r["content_hash"]),
            instance_key=str(r["instance_key"]),
        )
        for _, r in rows.iterrows()
    )
    modality = str(first.get("modality") or "")
    rescale_type = str(first.get("rescale_type") or "")
    units = "HU" if modality == "CT" or rescale_type == "HU" else rescale_type
    volume_id = volume_id_for(series_key, split_key)
    revision_src = json.dumps(
        {
            "layout": LAYOUT_VERSION,
            "shape": shape,
            "dtype": dtype,
            "slices": [(s.content_hash, s.frame) for s in slices],
            "affine": [round(v, 6) for v in affine.ravel()],
        },
        sort_keys=True,
    )
    revision = hashlib.blake2b(revision_src.encode(), digest_size=8).hexdigest()
    return VolumePlan(
        volume_id=volume_id,
        revision=revision,
        series_key=series_key,
        study_key=str(first.get("study_key") or ""),
        patient_key=str(first.get("patient_key") or ""),
        split_key=split_key,
        split_reason=reason,
        shape=shape,
        slices=slices,
        affine=tuple(float(v) for v in affine.ravel()),
        spacing=(float(np.linalg.norm(step_vec)), ps[0], ps[1]),
        dtype=dtype,
        wider_dtype=wider,
        units=units,
        rows=n_rows,
        columns=n_cols,
        bits_stored=int(_num(first.get("bits_stored"), _num(first.get("bits_allocated"), 16))),
        pixel_representation=int(_num(first.get("pixel_representation"), 0)),
        geometry={
            "slice_spacing_mean": float(np.mean(steps)),
            "slice_spacing_max_dev": float(deviation.max()) if len(deviation) else 0.0,
            "gantry_tilt_deg": tilt,
        },
        metadata={c: first.get(c) for c in _META_COLUMNS},
    )


def plan_volumes(
    instances: pd.DataFrame, *, spacing_tolerance: float = 0.05, max_voxels: int | None = None
) -> tuple[list[VolumePlan], list[PlanFailure]]:
    """Turn instance rows into volume plans and assembly failures (pure, deterministic).

    Parameters
    ----------
    instances
        Rows of the ``instances`` table (any subset of series; each series complete).
    spacing_tolerance
        Allowed relative deviation of a slice step from the median step.
    max_voxels
        Plans larger than this become ``too_large`` failures (refused before allocating).
    """
    plans: list[VolumePlan] = []
    failures: list[PlanFailure] = []
    if instances.empty:
        return plans, failures
    images = instances[
        instances["has_pixels"].fillna(False).astype(bool)
        & (instances["file_format"] == "dicom")
        & instances["series_key"].notna()
    ]
    for series_key, group in images.groupby("series_key", sort=True):
        group = group.sort_values("url", kind="stable")
        dupes = group.groupby("instance_key")["content_hash"].nunique()
        if (dupes > 1).any():
            failures.append(
                _fail(
                    str(series_key),
                    "duplicate_sop_instance",
                    "one SOP instance appears with different content",
                )
            )
            continue
        group = group.drop_duplicates("instance_key", keep="first")
        for split_key, reason, rows in _split(group):
            result = _plan_part(
                str(series_key), split_key, reason, rows, tolerance=spacing_tolerance
            )
            if isinstance(result, VolumePlan) and max_voxels and result.nvoxels > max_voxels:
                result = _fail(
                    result.volume_id, "too_large", f"{result.nvoxels} voxels exceed the cap"
                )
            (plans if isinstance(result, VolumePlan) else failures).append(result)  # type: ignore[arg-type]
    return plans, failures
