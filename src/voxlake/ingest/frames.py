"""Per-frame geometry and vendor extras, read on the worker from the ORIGINAL dataset.

De-identification drops private elements before the typed columns are built, yet the
facts needed to assemble a volume live partly in private tags (Siemens CSA headers,
Philips scale slopes, GE diffusion tags) and partly deep in the functional group
sequences of enhanced multi-frame objects (PS3.3 C.7.6.16). :func:`frame_columns`
extracts them from the original dataset into *non-identifying* values only: positions,
orientations, spacings, rescale factors, echo times, dimension indices, diffusion
b-values and directions, and times relative to the first frame of the same file.

The result fills these ``instances`` columns: ``layout`` (classic, enhanced, mosaic,
multiframe), ``frames_json`` (one object per frame, see :func:`frame_columns`),
``mosaic_tiles``, ``b_value``, ``b_vector``, ``philips_scale_slope``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydicom import Dataset

__all__ = ["CLASSIC_UNREAD", "FRAME_FORMAT_VERSION", "frame_columns"]

#: Version of the ``frames_json`` object layout.
FRAME_FORMAT_VERSION = 1

#: Public elements that vary from slice to slice and that :func:`frame_columns` does not
#: read from a classic image (``layout`` "classic": its result depends on the others
#: alone; ``tests/ingest/test_frames.py`` deletes them from real images to check it):
#: SOP instance UID, dates and times of content and acquisition, acquisition and instance
#: numbers, position, slice location, in-stack position, window, smallest and largest
#: pixel values.
CLASSIC_UNREAD: frozenset[int] = frozenset(
    {
        0x00080018, 0x00080022, 0x00080023, 0x0008002A, 0x00080032, 0x00080033,
        0x00200012, 0x00200013, 0x00200032, 0x00201041, 0x00209057,
        0x00281050, 0x00281051, 0x00280106, 0x00280107,
    }
)  # fmt: skip
_PHILIPS_DD001 = "Philips MR Imaging DD 001"
_PHILIPS_DD005 = "Philips MR Imaging DD 005"
_SIEMENS_CSA = "SIEMENS CSA HEADER"
_GE_ACQU = "GEMS_ACQU_01"
_GE_PARM = "GEMS_PARM_01"
_KINDS = {
    "MAGNITUDE": "M",
    "PHASE": "P",
    "REAL": "R",
    "IMAGINARY": "I",
    "MIXED": "MIXED",
}


def _floats(value: Any, n: int) -> list[float] | None:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def _listed(value: Any) -> list[Any]:
    """A DICOM value as a list (multi-valued elements are sequences, single ones are not)."""
    if value is None or isinstance(value, (str, bytes)):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def _float(value: Any) -> float | None:
    try:
        out = float(_listed(value)[0])
    except (TypeError, ValueError, IndexError):
        return None
    return out if math.isfinite(out) else None


def _int(value: Any) -> int | None:
    number = _float(value)
    return None if number is None else int(number)


def _first(item: Dataset | None, keyword: str) -> Dataset | None:
    """First item of sequence ``keyword`` in ``item`` (None when absent or empty)."""
    if item is None or keyword not in item:
        return None
    seq = item[keyword].value
    try:
        return seq[0] if len(seq) else None  # type: ignore[no-any-return]
    except TypeError:
        return None


def _groups(ds: Dataset) -> frozenset[int]:
    """The groups of `ds`'s elements (int keys: no element is converted)."""
    return frozenset(int(tag) >> 16 for tag in ds.keys())  # noqa: SIM118


def _private(
    ds: Dataset,
    group: int,
    creator: str,
    offset: int,
    *,
    vendor: bool = False,
    groups: frozenset[int] | None = None,
) -> Any:
    """Value of a private element located through its creator (None when absent).

    Anonymisers sometimes drop private creator elements but keep the data. With ``vendor``
    (the manufacturer is the tag's vendor) and no creator at all in ``group``, the
    vendor's usual block ``0x10`` is read, as dcm2niix does; a block reserved by another
    creator is never read. `groups`: ``_groups(ds)``, when the caller has it.
    """
    if group not in (_groups(ds) if groups is None else groups):
        return None  # nothing in the group: skips private_block's sorted slice
    try:
        block = ds.private_block(group, creator)
        return block[offset].value
    except (KeyError, ValueError):
        pass
    if not vendor or any((group, e) in ds for e in range(0x10, 0x100)):
        return None
    element = ds.get((group, 0x1000 | offset))
    return None if element is None else element.value


def _seconds(value: Any) -> float | None:
    """Seconds since the epoch of a DICOM DT value (used only to form differences)."""
    text = str(value or "").strip()
    if len(text) < 14:
        return None
    try:
        base = dt.datetime.strptime(text[:14], "%Y%m%d%H%M%S")
        fraction = float("0" + text[14:].split("+")[0].split("-")[0]) if len(text) > 14 else 0.0
    except ValueError:
        return None
    return base.replace(tzinfo=dt.UTC).timestamp() + fraction


def _kind(frame_type: Any, component: Any) -> str:
    """Image kind of a frame: magnitude/phase/real/imaginary or a derived map label."""
    comp = str(component or "").upper()
    values = [str(v).upper() for v in (frame_type or [])]
    label = values[3] if len(values) > 3 else ""
    if label and label not in ("NONE", "M", "MAGNITUDE"):
        # e.g. FIELD_MAP, ADC, T1_MAP, P: a derived value map is never mixed with magnitude.
        return label
    return _KINDS.get(comp, label or "")


# -- enhanced multi-frame ------------------------------------------------------------------


def _enhanced_frame(frame: Dataset, shared: Dataset | None) -> dict[str, Any]:
    def macro(keyword: str) -> Dataset | None:
        return _first(frame, keyword) or _first(shared, keyword)

    out: dict[str, Any] = {}
    plane = macro("PlanePositionSequence")
    if plane is not None:
        out["position"] = _floats(plane.get("ImagePositionPatient"), 3)
    orient = macro("PlaneOrientationSequence")
    if orient is not None:
        out["orientation"] = _floats(orient.get("ImageOrientationPatient"), 6)
    measures = macro("PixelMeasuresSequence")
    if measures is not None:
        out["pixel_spacing"] = _floats(measures.get("PixelSpacing"), 2)
        out["thickness"] = _float(measures.get("SliceThickness"))
    pvt = macro("PixelValueTransformationSequence")
    if pvt is not None:
        out["slope"] = _float(pvt.get("RescaleSlope"))
        out["intercept"] = _float(pvt.get("RescaleIntercept"))
        out["rescale_type"] = str(pvt.get("RescaleType") or "") or None
    content = macro("FrameContentSequence")
    if content is not None:
        dims = content.get("DimensionIndexValues")
        if dims is not None:
            with contextlib.suppress(TypeError, ValueError):
                out["dim"] = [int(v) for v in _listed(dims)]
        out["stack"] = str(content.get("StackID") or "") or None
        out["in_stack"] = _int(content.get("InStackPositionNumber"))
        out["temporal_index"] = _int(content.get("TemporalPositionIndex"))
        out["acquisition"] = _int(content.get("FrameAcquisitionNumber"))
        out["_time"] = _seconds(content.get("FrameAcquisitionDateTime"))
    for element in frame if frame is not None else ():
        keyword = element.keyword or ""
        if keyword.endswith("FrameTypeSequence") and len(element.value):
            item = element.value[0]
            out["kind"] = _kind(item.get("FrameType"), item.get("ComplexImageComponent"))
            break
    echo = macro("MREchoSequence")
    if echo is not None:
        out["echo_time"] = _float(echo.get("EffectiveEchoTime"))
    timing = macro("MRTimingAndRelatedParametersSequence")
    if timing is not None:
        out["repetition_time"] = _float(timing.get("RepetitionTime"))
    cardiac = macro("CardiacSynchronizationSequence")
    if cardiac is not None:
        out["trigger_time"] = _float(cardiac.get("NominalCardiacTriggerDelayTime"))
    diffusion = macro("MRDiffusionSequence")
    if diffusion is not None:
        out["b_value"] = _float(diffusion.get("DiffusionBValue"))
        direction = _first(diffusion, "DiffusionGradientDirectionSequence")
        if direction is not None:
            out["b_vector"] = _floats(direction.get("DiffusionGradientOrientation"), 3)
        elif str(diffusion.get("DiffusionDirectionality") or "").upper() in ("NONE", "ISOTROPIC"):
            out["b_vector"] = None
    philips = _philips_frame_scale(frame)
    if philips is not None:
        out["philips_scale_slope"] = philips
    return {k: v for k, v in out.items() if v is not None}


def _philips_frame_scale(frame: Dataset | None) -> float | None:
    """Philips MR scale slope (2005,100E) from the private per-frame item (2005,140F)."""
    if frame is None:
        return None
    item_seq = _private(frame, 0x2005, _PHILIPS_DD005, 0x0F)
    if not item_seq:
        return None
    try:
        item = item_seq[0]
    except (TypeError, IndexError):
        return None
    value = _float(_private(item, 0x2005, _PHILIPS_DD001, 0x0E))
    return value if value not in (None, 0.0) else None


def _enhanced(ds: Dataset) -> dict[str, Any]:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    n_frames = _int(ds.get("NumberOfFrames")) or 0
    if len(per_frame) != n_frames or n_frames < 1:
        return {"error": "bad_functional_groups"}
    frames = [_enhanced_frame(item, shared) for item in per_frame]
    times = [f.pop("_time", None) for f in frames]
    if all(t is not None for t in times):
        start = min(t for t in times if t is not None)
        for frame, value in zip(frames, times, strict=True):
            frame["time"] = round(float(value or 0.0) - start, 6)
    return {"frames": frames}


# -- Siemens mosaic ------------------------------------------------------------------------


def _csa(ds: Dataset, groups: frozenset[int]) -> dict[str, Any] | None:
    # Nothing in group 0029, no CSA header: do not import nibabel (and scipy) for the
    # many Siemens files without one (CT).
    if 0x0029 not in groups:
        return None
    with warnings.catch_warnings():
        # nibabel.nicom warns on import that its (unused here) DICOM readers are experimental.
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import csareader

    try:
        header = csareader.get_csa_header(ds, "image")
    except Exception:
        return None
    return header if isinstance(header, dict) else None


def _csa_value(header: dict[str, Any] | None, name: str, n: int) -> list[float] | None:
    if header is None:
        return None
    items = header.get("tags", {}).get(name, {}).get("items") or []
    if len(items) < n:
        return None
    return _floats(items[:n], n)


def _mosaic(ds: Dataset, csa: dict[str, Any] | None) -> dict[str, Any]:
    tiles = _csa_value(csa, "NumberOfImagesInMosaic", 1)
    rows, cols = _int(ds.get("Rows")) or 0, _int(ds.get("Columns")) or 0
    if not tiles or tiles[0] < 1:
        return {"error": "mosaic_tiles_unknown"}
    n = int(tiles[0])
    grid = math.ceil(math.sqrt(n))
    if rows % grid or cols % grid:
        return {"error": "bad_mosaic"}
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    ps = _floats(ds.get("PixelSpacing"), 2)
    step = _float(ds.get("SpacingBetweenSlices")) or _float(ds.get("SliceThickness"))
    normal = _csa_value(csa, "SliceNormalVector", 3)
    if iop is None or ipp is None or ps is None or not step or normal is None:
        return {"error": "mosaic_geometry_unknown"}
    first_slice = _csa_value(csa, "ProtocolSliceNumber", 1)
    if first_slice is not None and first_slice[0] > 1:
        # The first tile is not the first protocol slice: whether tiles then run along or
        # against the slice normal is undocumented (dcm2niix flips and warns "untested").
        return {"error": "mosaic_order_ambiguous"}
    tile_rows, tile_cols = rows // grid, cols // grid
    # PS3.3 positions the mosaic as one big image: move to the first tile's first voxel.
    shift_c, shift_r = (cols - tile_cols) / 2.0, (rows - tile_rows) / 2.0
    origin = [ipp[a] + iop[a] * ps[1] * shift_c + iop[3 + a] * ps[0] * shift_r for a in range(3)]
    length = math.sqrt(sum(v * v for v in normal))
    if not 0.99 < length < 1.01:
        return {"error": "mosaic_geometry_unknown"}
    unit = [v / length for v in normal]
    frames = [
        {"position": [round(origin[a] + k * step * unit[a], 6) for a in range(3)]} for k in range(n)
    ]
    return {
        "frames": frames,
        "mosaic": {"grid": grid, "tile_rows": tile_rows, "tile_columns": tile_cols},
    }


def _is_mosaic(ds: Dataset) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return "MOSAIC" in image_type


# -- classic diffusion ---------------------------------------------------------------------


def _diffusion(
    ds: Dataset, csa: dict[str, Any] | None, groups: frozenset[int]
) -> tuple[float | None, Any]:
    """b-value and gradient direction (patient LPS) of a single-frame image, if any."""
    maker = str(ds.get("Manufacturer") or "").upper()
    philips, ge = "PHILIPS" in maker, maker.startswith("GE")
    b_value = _float(ds.get("DiffusionBValue"))
    vector = _floats(ds.get("DiffusionGradientOrientation"), 3)
    if b_value is None and csa is not None:
        b_csa = _csa_value(csa, "B_value", 1)
        if b_csa is not None:
            b_value = b_csa[0]
            vector = _csa_value(csa, "DiffusionGradientDirection", 3)
    if b_value is None:
        philips_b = _float(
            _private(ds, 0x2001, "Philips Imaging DD 001", 0x03, vendor=philips, groups=groups)
        )
        if philips_b is not None:
            b_value = philips_b
            vector = _floats(
                [
                    _private(ds, 0x2005, _PHILIPS_DD001, o, vendor=philips, groups=groups)
                    for o in (0xB0, 0xB1, 0xB2)
                ],
                3,
            )
    if b_value is None:
        ge_b = _private(ds, 0x0043, _GE_PARM, 0x39, vendor=ge, groups=groups)
        if ge_b is not None:
            value = _float(ge_b)
            if value is not None:
                # GE adds 10^9 (or 10^5 on old software) to flag the b-value "scan type".
                b_value = value % 1e9 if value >= 1e9 else value
                b_value = b_value % 1e5 if b_value >= 1e5 else b_value
                vector = None  # GE directions are in a vendor frame: not converted
    if vector is not None and all(abs(v) < 1e-9 for v in vector):
        vector = None
    return b_value, vector


def frame_columns(ds: Dataset) -> dict[str, Any]:
    """Derived, non-identifying ``instances`` columns from the original dataset.

    Parameters
    ----------
    ds
        The dataset as read, before de-identification (private tags intact).

    Returns
    -------
    dict
        ``layout``; ``frames_json``: a JSON object ``{"v": 1, "frames": [...],
        "mosaic": {...}, "error": code}`` where each frame object may hold
        ``position`` (LPS mm), ``orientation`` (6 cosines), ``pixel_spacing``,
        ``thickness``, ``slope``, ``intercept``, ``rescale_type``, ``dim`` (Dimension
        Index Values), ``stack``, ``in_stack``, ``temporal_index``, ``acquisition``,
        ``time`` (s after the file's first frame), ``kind``, ``echo_time``,
        ``repetition_time``, ``trigger_time``, ``b_value``, ``b_vector`` (LPS) and
        ``philips_scale_slope``; ``mosaic_tiles``; ``b_value`` and ``b_vector`` for
        single-frame diffusion images; ``philips_scale_slope``.
    """
    out: dict[str, Any] = {
        "layout": "classic",
        "frames_json": None,
        "mosaic_tiles": None,
        "b_value": None,
        "b_vector": None,
        "philips_scale_slope": None,
    }
    n_frames = _int(ds.get("NumberOfFrames")) or 1
    manufacturer = str(ds.get("Manufacturer") or "").upper()
    groups = _groups(ds)
    csa = _csa(ds, groups) if "SIEMENS" in manufacturer or _is_mosaic(ds) else None
    info: dict[str, Any] | None = None
    if "PerFrameFunctionalGroupsSequence" in ds:
        out["layout"] = "enhanced"
        info = _enhanced(ds)
    elif _is_mosaic(ds) and n_frames == 1:
        out["layout"] = "mosaic"
        info = _mosaic(ds, csa)
        tiles = info.get("frames")
        out["mosaic_tiles"] = len(tiles) if tiles else None
    elif n_frames > 1:
        out["layout"] = "multiframe"
        info = {"error": "multiframe_geometry_unknown"}
    if info is not None:
        out["frames_json"] = json.dumps({"v": FRAME_FORMAT_VERSION, **info}, sort_keys=True)
    if out["layout"] in ("classic", "mosaic"):
        out["b_value"], out["b_vector"] = _diffusion(ds, csa, groups)
        philips = "PHILIPS" in manufacturer
        scale = _float(_private(ds, 0x2005, _PHILIPS_DD001, 0x0E, vendor=philips, groups=groups))
        out["philips_scale_slope"] = scale if scale not in (None, 0.0) else None
    return out
