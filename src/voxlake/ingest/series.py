"""Series assembly (driver, pure): group instance rows into correct volume plans.

Rules (``docs/series-assembly.md`` explains them with every failure code):

1. Group by ``series_key`` (keyed SeriesInstanceUID). Identical copies of one instance
   (same SOP instance, same bytes) count once; the same SOP instance with different bytes
   makes the series ambiguous (``duplicate_sop_instance``).
2. Every instance becomes frames: a single-frame image is one frame, an enhanced
   multi-frame image one frame per functional-group item, a Siemens mosaic one per tile.
3. Split where one volume would be wrong: series number, stack (multi-frame StackID),
   image orientation, rows/columns, pixel spacing, echo number, echo time, image kind
   (magnitude/phase/real/imaginary or a derived map), samples per pixel, photometric
   interpretation (colour series become (c, z, y, x) volumes, ``axes = "czyx"``). Each part
   records what distinguished it in ``split_key`` / ``split_reason``; parts that cannot
   stack are split by acquisition number or temporal position when each group stacks.
4. Sort along the slice normal ``n = row x col`` by ``ImagePositionPatient . n``, never by
   InstanceNumber.
5. Positions repeated the same number of times make a 4D (t, z, y, x) volume, ordered in t
   by temporal position, dimension index, trigger time, acquisition and instance number;
   every timepoint must agree on its temporal index and diffusion encoding across slices.
6. Spacing must be uniform within ``spacing_tolerance``: a gap that is a whole multiple of
   the usual step is ``missing_slice``, anything else ``irregular_spacing`` (or, when
   configured, an equidistant resampled copy labelled ``resampled``).
7. The affine is exact (a tilted gantry gives a sheared affine, with the tilt recorded).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from voxlake.errors import AssemblyError
from voxlake.ingest.frame_table import Frame, explode_frames
from voxlake.ingest.stacking import plan_stack
from voxlake.keys import volume_id_for

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pandas as pd

    from voxlake.ingest.readers.native import PixelSpan

__all__ = [
    "LAYOUT_VERSION",
    "PlanFailure",
    "SliceRef",
    "VolumePlan",
    "iter_volume_plans",
    "plan_volumes",
    "with_revision",
]

#: Bump when the stored representation changes, so revisions (and volumes) are rebuilt.
LAYOUT_VERSION = 2

_IMAGE_FILE_FORMATS = ("nifti", "minc", "analyze")
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
    "slice_thickness",  # nominal SliceThickness: lets volume queries filter on it
)


@dataclass(frozen=True)
class SliceRef:
    """One 2D frame of a volume: where its pixels are and how to rescale them.

    ``frame`` is the frame index in a multi-frame file, or the tile index of a mosaic
    (``mosaic_grid`` > 0 tiles per mosaic row); 0 for a single-frame file. ``pixels``,
    when the header pass of this run recorded it, locates a native frame's pixel values
    in the file (read with one ranged read instead of parsing the file again).
    """

    url: str
    frame: int
    slope: float
    intercept: float
    content_hash: str
    instance_key: str
    mosaic_grid: int = 0
    pixels: PixelSpan | None = None


@dataclass(frozen=True)
class VolumePlan:
    """Everything a worker needs to build one volume, decided on the driver.

    ``resample`` is set for an equidistant copy of an irregular stack: the source slice
    distances along the stack (mm, ascending) and the target step; the worker
    interpolates linearly between the two nearest source slices.
    """

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
    layout: str = "classic"
    resample: tuple[tuple[float, ...], float] | None = None
    axes: str = ""

    @property
    def dims(self) -> str:
        """Axis names of ``shape``: ``zyx``, ``tzyx`` or ``czyx`` (colour channels first)."""
        return self.axes or ("zyx" if len(self.shape) == 3 else "tzyx")

    @property
    def nvoxels(self) -> int:
        return math.prod(self.shape)

    @property
    def source_shape(self) -> tuple[int, ...]:
        """Shape of the stack of source slices (differs from ``shape`` when resampled)."""
        if self.resample is None:
            return self.shape
        return (*self.shape[:-3], len(self.resample[0]), *self.shape[-2:])


@dataclass(frozen=True)
class PlanFailure:
    """A series (or part of one) that cannot be assembled into a correct volume."""

    subject: str
    error: AssemblyError


def _fail(subject: str, code: str, message: str) -> PlanFailure:
    return PlanFailure(subject, AssemblyError(message, code=code))


def _signature(frame: Frame) -> dict[str, Any]:
    return {
        "series_number": frame.series_number,
        "stack": frame.stack,
        "orientation": tuple(round(v, 3) for v in frame.orientation) if frame.orientation else None,
        "matrix": (frame.rows, frame.columns),
        "pixel_spacing": tuple(round(v, 4) for v in frame.pixel_spacing)
        if frame.pixel_spacing
        else None,
        "echo": frame.echo_number or 0,
        "echo_time": None if frame.echo_time is None else round(frame.echo_time, 2),
        "image_kind": frame.kind,
        "samples": frame.samples,
        "photometric": frame.photometric,
    }


def _split(frames: list[Frame]) -> list[tuple[str, str, list[Frame]]]:
    """Split frames into parts with one geometry each: (split_key, reason, frames)."""
    parts: dict[str, list[Frame]] = {}
    for frame in frames:
        parts.setdefault(json.dumps(_signature(frame), sort_keys=True), []).append(frame)
    if len(parts) == 1:
        return [("", "", frames)]
    decoded = {sig: json.loads(sig) for sig in parts}
    keys = next(iter(decoded.values())).keys()
    differing = sorted(k for k in keys if len({json.dumps(d[k]) for d in decoded.values()}) > 1)
    out = []
    for sig in sorted(parts):
        key = ";".join(f"{k}={json.dumps(decoded[sig][k])}" for k in differing)
        out.append((key, ",".join(differing), parts[sig]))
    return out


def _revision(plan: VolumePlan) -> str:
    source = json.dumps(
        {
            "layout": LAYOUT_VERSION,
            "shape": plan.shape,
            "dtype": plan.dtype,
            "slices": [(s.content_hash, s.frame, s.slope, s.intercept) for s in plan.slices],
            "affine": [round(v, 6) for v in plan.affine],
            "resample": plan.resample,
            **({"axes": plan.dims} if plan.dims == "czyx" else {}),
        },
        sort_keys=True,
    )
    return hashlib.blake2b(source.encode(), digest_size=8).hexdigest()


def with_revision(plan: VolumePlan) -> VolumePlan:
    """``plan`` with its ``revision``: a digest of the exact inputs and layout."""
    return replace(plan, revision=_revision(plan))


def _plan_part(
    series_key: str,
    split_key: str,
    reason: str,
    frames: list[Frame],
    first: pd.Series,
    *,
    tolerance: float,
    philips_scaling: str,
    resample_irregular: bool,
) -> list[VolumePlan | PlanFailure]:
    subject = series_key if not split_key else f"{series_key}#{split_key}"
    try:
        stacks = plan_stack(
            frames,
            tolerance=tolerance,
            philips_precise=philips_scaling == "precise",
            resample_irregular=resample_irregular,
            first=first,
        )
    except AssemblyError as exc:
        return [PlanFailure(subject, exc)]
    out: list[VolumePlan | PlanFailure] = []
    for stack in stacks:
        key = split_key if not stack.resampled else f"{split_key}|resampled".lstrip("|")
        why = reason if not stack.resampled else ",".join(filter(None, [reason, "resampled"]))
        metadata = {c: first.get(c) for c in _META_COLUMNS}
        metadata.update(stack.columns)
        plan = VolumePlan(
            volume_id=volume_id_for(series_key, key),
            revision="",
            series_key=series_key,
            study_key=str(first.get("study_key") or ""),
            patient_key=str(first.get("patient_key") or ""),
            split_key=key,
            split_reason=why,
            shape=stack.shape,
            slices=stack.slices,
            affine=stack.affine,
            spacing=stack.spacing,
            dtype=stack.dtype,
            wider_dtype=stack.wider_dtype,
            units=stack.units,
            rows=stack.shape[-2],
            columns=stack.shape[-1],
            bits_stored=stack.bits_stored,
            pixel_representation=stack.pixel_representation,
            geometry=stack.geometry,
            metadata=metadata,
            layout=stack.layout,
            resample=stack.resample,
            axes=stack.axes,
        )
        out.append(with_revision(plan))
    return out


def _pixel_description_problem(group: pd.DataFrame) -> str:
    """Why Rows, Columns or BitsAllocated cannot describe the pixels ("" when they can);
    checked before anything is allocated or decoded."""
    import pandas as pd

    for name, what in (("rows", "Rows"), ("columns", "Columns")):
        values = pd.to_numeric(group.get(name, pd.Series(dtype=float)), errors="coerce")
        if bool((values.isna() | (values < 1)).any()):
            return f"{what} missing or not a positive number"
    if "bits_allocated" in group:
        bits = pd.to_numeric(group["bits_allocated"], errors="coerce")
        if not bool(((bits == 1) | ((bits % 8 == 0) & (bits >= 8) & (bits <= 64))).all()):
            return "BitsAllocated missing or not 1 or a multiple of 8 up to 64"
    return ""


def _plan_series(
    series_key: str, group: pd.DataFrame, **options: Any
) -> list[VolumePlan | PlanFailure]:
    group = group.sort_values("url", kind="stable")
    dupes = group.groupby("instance_key")["content_hash"].nunique()
    if (dupes > 1).any():
        return [
            _fail(
                series_key,
                "duplicate_sop_instance",
                "one SOP instance appears with different content",
            )
        ]
    group = group.drop_duplicates("instance_key", keep="first")
    problem = _pixel_description_problem(group)
    if problem:
        return [_fail(series_key, "bad_pixel_description", problem)]
    try:
        frames = explode_frames(group)
    except AssemblyError as exc:
        return [PlanFailure(series_key, exc)]
    first = group.iloc[0]
    out: list[VolumePlan | PlanFailure] = []
    for split_key, reason, part in _split(frames):
        planned = _plan_part(series_key, split_key, reason, part, first, **options)
        if _stack_failed(planned):
            planned = (
                _by_acquisition(series_key, split_key, reason, part, first, **options) or planned
            )
        out.extend(planned)
    return out


_STACK_CODES = (
    "duplicate_position",
    "missing_slice",
    "irregular_spacing",
    "nonlinear_stack",
    "ambiguous_timepoints",
)


def _stack_failed(planned: list[VolumePlan | PlanFailure]) -> bool:
    return (
        len(planned) == 1
        and isinstance(planned[0], PlanFailure)
        and planned[0].error.code in _STACK_CODES
    )


def _by_acquisition(
    series_key: str,
    split_key: str,
    reason: str,
    frames: list[Frame],
    first: pd.Series,
    **options: Any,
) -> list[VolumePlan | PlanFailure] | None:
    """Split by AcquisitionNumber, else by temporal position, when the whole part cannot
    stack but each group can (acquisitions or time points that change the geometry, such
    as a moving table); None when no such split gives only volumes."""
    for attribute, name in (
        ("acquisition_number", "acquisition"),
        ("temporal_position_identifier", "temporal_position"),
        ("temporal_index", "temporal_position"),
    ):
        groups: dict[int | None, list[Frame]] = {}
        for frame in frames:
            groups.setdefault(getattr(frame, attribute), []).append(frame)
        if len(groups) < 2 or None in groups:
            continue
        why = ",".join(filter(None, [reason, name]))
        out: list[VolumePlan | PlanFailure] = []
        for number in sorted(k for k in groups if k is not None):
            key = ";".join(filter(None, [split_key, f"{name}={number}"]))
            out.extend(_plan_part(series_key, key, why, groups[number], first, **options))
        if all(isinstance(p, VolumePlan) for p in out):
            return out
    return None


def plan_volumes(
    instances: pd.DataFrame,
    *,
    spacing_tolerance: float = 0.05,
    max_voxels: int | None = None,
    philips_scaling: Literal["display", "precise"] = "display",
    resample_irregular: bool = False,
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
    philips_scaling
        ``"display"``: the DICOM rescale (RescaleSlope/Intercept, PS3.3 C.11.1).
        ``"precise"``: Philips floating-point values ``display / (RS * SS)`` using the
        private scale slope, as dcm2niix writes by default.
    resample_irregular
        Write an equidistant, linearly resampled copy (``resampled``) of a stack whose
        slice spacing varies, instead of only refusing it (``irregular_spacing``).
    """
    plans: list[VolumePlan] = []
    failures: list[PlanFailure] = []
    for result in iter_volume_plans(
        instances,
        spacing_tolerance=spacing_tolerance,
        max_voxels=max_voxels,
        philips_scaling=philips_scaling,
        resample_irregular=resample_irregular,
    ):
        if isinstance(result, VolumePlan):
            plans.append(result)
        else:
            failures.append(result)
    return plans, failures


def iter_volume_plans(
    instances: pd.DataFrame,
    *,
    spacing_tolerance: float = 0.05,
    max_voxels: int | None = None,
    philips_scaling: Literal["display", "precise"] = "display",
    resample_irregular: bool = False,
) -> Iterator[VolumePlan | PlanFailure]:
    """What :func:`plan_volumes` returns, one plan or failure at a time, series by series
    (image files first), so that a caller can start building the first volumes while the
    rest is planned. Same parameters."""
    from voxlake.ingest.readers.nifti import plan_image_file

    if instances.empty:
        return
    usable = instances["has_pixels"].fillna(False).astype(bool) & instances["series_key"].notna()
    files = instances[usable & instances["file_format"].isin(_IMAGE_FILE_FORMATS)]
    dicom = instances[usable & (instances["file_format"] == "dicom")]
    options = {
        "tolerance": spacing_tolerance,
        "philips_scaling": philips_scaling,
        "resample_irregular": resample_irregular,
    }

    def capped(result: VolumePlan | PlanFailure) -> VolumePlan | PlanFailure:
        if isinstance(result, VolumePlan) and max_voxels and result.nvoxels > max_voxels:
            return _fail(result.volume_id, "too_large", f"{result.nvoxels} voxels exceed the cap")
        return result

    for _, row in files.sort_values("url").iterrows():
        yield capped(plan_image_file(row))
    for series_key, group in dicom.groupby("series_key", sort=True):
        for result in _plan_series(str(series_key), group, **options):
            yield capped(result)
