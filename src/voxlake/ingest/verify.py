"""Compare voxlake's volumes with reference NIfTI files (dcm2niix, dicom2nifti, ...).

:func:`verify` ingests the input folder of every reference into a throwaway catalog and
store (a random secret: nothing is kept), then, for every reference NIfTI, picks the
volume that best matches it and reports: shape, voxel equality after both are reoriented
to the closest canonical (RAS) orientation, and the affine error in millimetres (the
largest displacement of a corner voxel centre). This is the rule dicom2nifti's own tests
use; voxels must be *equal* for integer data and equal to 1e-4 of the largest magnitude
for float data (converters store float scale factors in float32).

Which input folder belongs to a reference:

- ``X_ground_truth*.nii[.gz]`` next to a folder ``X`` (dicom2nifti's test layout): ``X``;
- a file in a folder named ``Ref*`` whose parent holds ``In`` (dcm2niix's dcm_qa layout):
  that ``In``;
- otherwise the ``INPUT_DIR`` given.

A result whose input folder is not ``INPUT_DIR`` names it on its line. A missing
``INPUT_DIR`` or ``REFERENCE_DIR``, or no reference under ``REFERENCE_DIR``, is a
:class:`~voxlake.errors.SourceError` (nothing is ingested).

A dcm2niix JSON sidecar narrows the candidates to its ``SeriesNumber`` and, when it says
``UsePhilipsFloatNotDisplayScaling: 1``, the input is ingested with
``philips_scaling="precise"`` (dcm2niix's default for Philips). A ``.bval`` next to the
reference must match the volume's ``b_values``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from voxlake.errors import SourceError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pandas as pd

    from voxlake.config import IngestConfig

__all__ = [
    "ReferenceResult",
    "VerifyReport",
    "compare_volume",
    "find_references",
    "input_for",
    "reference_array",
    "verify",
]

_DICOM2NIFTI = re.compile(r"^(?P<stem>.+)_ground_truth(_reoriented)?\.nii(\.gz)?$")
AFFINE_TOL_MM = 1e-3
FLOAT_RTOL = 1e-4


@dataclass(frozen=True)
class ReferenceResult:
    """The outcome for one reference file."""

    reference: str
    input: str
    matched: bool
    detail: str
    volume_id: str | None = None
    shape: tuple[int, ...] = ()
    reference_shape: tuple[int, ...] = ()
    max_abs_diff: float | None = None
    affine_error_mm: float | None = None
    #: True when ``input`` came from the reference's layout (an ``In`` folder beside its
    #: ``Ref*`` folder, or dicom2nifti's ``X``), not the ``INPUT_DIR`` given.
    own_input: bool = False

    def line(self) -> str:
        verdict = "match   " if self.matched else "MISMATCH"
        where = f" (input {self.input})" if self.own_input else ""
        return f"{verdict} {self.reference}: {self.detail}{where}"


@dataclass
class VerifyReport:
    """All results, in reference order; :meth:`lines` is what the CLI prints."""

    results: list[ReferenceResult] = field(default_factory=list)

    @property
    def matched(self) -> int:
        return sum(r.matched for r in self.results)

    @property
    def total(self) -> int:
        return len(self.results)

    def lines(self) -> list[str]:
        return [r.line() for r in self.results] + [f"matched {self.matched} of {self.total}"]


def find_references(reference_dir: str | os.PathLike[str]) -> list[Path]:
    """Every ``.nii`` / ``.nii.gz`` under ``reference_dir``, sorted."""
    root = Path(reference_dir)
    found = [p for p in root.rglob("*") if p.is_file() and p.name.endswith((".nii", ".nii.gz"))]
    return sorted(found)


def input_for(reference: Path, input_dir: str | os.PathLike[str]) -> Path:
    """The input folder a reference was converted from (see the module docstring)."""
    match = _DICOM2NIFTI.match(reference.name)
    if match and (reference.parent / match["stem"]).is_dir():
        return reference.parent / match["stem"]
    for parent in reference.parents:
        if parent.name.startswith("Ref") and (parent.parent / "In").is_dir():
            return parent.parent / "In"
    return Path(input_dir)


def _sidecar(reference: Path, suffix: str) -> Path | None:
    stem = reference.name.removesuffix(".gz").removesuffix(".nii")
    path = reference.with_name(stem + suffix)
    return path if path.exists() else None


def _canonical(data: np.ndarray, affine: np.ndarray) -> Any:
    import nibabel as nib

    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return nib.as_closest_canonical(nib.Nifti1Image(data, affine))


def reference_array(reference: Any) -> np.ndarray:
    """A reference's voxels; colour (RGB24 / RGBA32) becomes a last axis of channels.

    nibabel exposes colour NIfTI as a structured dtype with fields R, G, B (and A). An
    alpha channel that is fully opaque everywhere carries nothing and is dropped (the
    DICOM source has none); any other alpha is kept, so the comparison fails on shape.
    """
    data = np.asarray(reference.dataobj)
    if data.dtype.fields is None:
        return data
    names = list(data.dtype.names or ())
    if "A" in names:
        alpha = data["A"]
        if alpha.size and np.all(alpha == np.iinfo(alpha.dtype).max):
            names.remove("A")
    return np.stack([data[name] for name in names], axis=-1)


def _corners(shape: tuple[int, ...]) -> np.ndarray:
    ends = [(0, n - 1) for n in shape[:3]]
    return np.array([[i, j, k, 1.0] for i in ends[0] for j in ends[1] for k in ends[2]]).T


def compare_volume(
    ours: np.ndarray, affine: np.ndarray, reference: Any
) -> tuple[bool, str, float | None, float | None, tuple[int, ...], tuple[int, ...]]:
    """Compare a stored (t,) z, y, x array and its RAS affine with a nibabel image.

    A colour volume (c, z, y, x) is compared with a colour reference channel by channel
    (see :func:`reference_array`). Returns (matched, detail, max_abs_diff,
    affine_error_mm, our_shape, reference_shape), shapes in nibabel (i, j, k[, t | c])
    order after canonical reorientation.
    """
    order = tuple(range(ours.ndim))[::-1]
    mine = _canonical(np.ascontiguousarray(ours.transpose(order)), affine)
    ref = _canonical(reference_array(reference), reference.affine)
    a_shape, r_shape = tuple(mine.shape), tuple(ref.shape)
    if a_shape != r_shape:
        return False, f"shape {a_shape} != reference {r_shape}", None, None, a_shape, r_shape
    corners = _corners(a_shape)
    error = float(np.abs(mine.affine @ corners - ref.affine @ corners).max())
    a = np.asarray(mine.dataobj)
    b = np.asarray(ref.dataobj)
    if np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer):
        diff = float(np.abs(a.astype(np.int64) - b.astype(np.int64)).max()) if a.size else 0.0
        equal = diff == 0
        kind = "voxels equal" if equal else f"voxels differ (max |diff| {diff:g})"
    else:
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        diff = float(np.nanmax(np.abs(a64 - b64))) if a.size else 0.0
        scale = max(float(np.nanmax(np.abs(b64))) if b.size else 0.0, 1e-12)
        equal = bool(np.array_equal(np.isnan(a64), np.isnan(b64)) and diff <= FLOAT_RTOL * scale)
        kind = f"float voxels {'equal' if equal else 'differ'} (max |diff| {diff:.3g})"
    ok = equal and error <= AFFINE_TOL_MM
    detail = f"shape {a_shape}, {kind}, affine max error {error:.2g} mm"
    return ok, detail, diff, error, a_shape, r_shape


@dataclass
class _Ingested:
    volumes: pd.DataFrame
    failures: list[str]


def _ingest(source: Path, config: IngestConfig, client: Any, workdir: Path) -> _Ingested:
    from voxlake.catalog import open_catalog
    from voxlake.ingest.pipeline import ingest

    target = Path(tempfile.mkdtemp(prefix="verify-", dir=workdir))
    ingest(
        [source], catalog=target / "catalog", store=target / "store", config=config, client=client
    )
    catalog = open_catalog(target / "catalog")
    failures = sorted(f"{r.subject_kind}:{r.code}" for r in catalog.failures.itertuples())
    return _Ingested(catalog.volumes, failures)


def _candidates(volumes: pd.DataFrame, reference: Path) -> pd.DataFrame:
    side = _sidecar(reference, ".json")
    if side is None or volumes.empty:
        return volumes
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return volumes
    number = meta.get("SeriesNumber")
    if number is not None and "series_number" in volumes:
        narrowed = volumes[volumes["series_number"] == int(number)]
        if not narrowed.empty:
            return narrowed
    return volumes


def _check_bvals(row: Any, reference: Path) -> str | None:
    path = _sidecar(reference, ".bval")
    if path is None:
        return None
    expected = np.array([float(v) for v in path.read_text().split()])
    got = np.asarray(row.b_values if row.b_values is not None else [], dtype=float)
    if got.shape != expected.shape or not np.allclose(got, expected, atol=1.0):
        return f"b-values {got.tolist()} != reference {expected.tolist()}"
    return None


def _evaluate(reference: Path, label: str, source: Path, ingested: _Ingested) -> ReferenceResult:
    import nibabel as nib

    from voxlake.volumes import read_volume

    ref = nib.load(reference)
    best: ReferenceResult | None = None
    for row in _candidates(ingested.volumes, reference).itertuples():
        data, _ = read_volume(str(row.store_url), str(row.store_path))
        affine = np.asarray(row.affine, dtype=float).reshape(4, 4)
        ok, detail, diff, err, shape, rshape = compare_volume(data, affine, ref)
        problem = _check_bvals(row, reference) if ok else None
        if problem:
            ok, detail = False, f"{detail}; {problem}"
        result = ReferenceResult(
            label, str(source), ok, detail, str(row.volume_id), shape, rshape, diff, err
        )
        rank = (not ok, shape != rshape, err if err is not None else np.inf)
        if best is None or rank < (
            not best.matched,
            best.shape != best.reference_shape,
            best.affine_error_mm if best.affine_error_mm is not None else np.inf,
        ):
            best = result
    if best is None:
        why = ", ".join(ingested.failures) or "nothing ingested"
        return ReferenceResult(label, str(source), False, f"no volume (failures: {why})")
    return best


@dataclass
class _Plan:
    reference: Path
    source: Path
    precise: bool


def _plans(input_dir: Path, reference_dir: Path) -> Iterator[_Plan]:
    references = find_references(reference_dir)
    if not references:
        raise SourceError(
            f"no reference NIfTI (.nii / .nii.gz) under {reference_dir}: nothing to compare",
            code="no_references",
            hint="REFERENCE_DIR is searched recursively for .nii and .nii.gz files"
            " (a converter's output); check the path",
        )
    for reference in references:
        source = input_for(reference, input_dir)
        side = _sidecar(reference, ".json")
        precise = False
        if side is not None:
            try:
                precise = json.loads(side.read_text()).get("UsePhilipsFloatNotDisplayScaling") == 1
            except (OSError, ValueError):
                precise = False
        yield _Plan(reference, source, precise)


def verify(
    input_dir: str | os.PathLike[str],
    reference_dir: str | os.PathLike[str],
    *,
    client: Any = None,
    config: IngestConfig | None = None,
    workdir: str | os.PathLike[str] | None = None,
) -> VerifyReport:
    """Ingest and compare every reference NIfTI under ``reference_dir``.

    Parameters
    ----------
    input_dir
        Folder of DICOM (or other) inputs for references without their own input folder.
    reference_dir
        Folder searched recursively for ``.nii`` / ``.nii.gz`` references.
    client
        A ``distributed.Client`` to reuse; default: one local cluster for the whole run.
    config
        Base ingest options; a random secret is used when it has none.
    workdir
        Where the throwaway catalogs and stores go (default: a temporary folder).

    Raises
    ------
    SourceError
        ``source_not_found`` when ``input_dir`` or ``reference_dir`` does not exist;
        ``no_references`` when ``reference_dir`` holds no ``.nii`` / ``.nii.gz``.
    """
    from voxlake.cluster import dask_client
    from voxlake.config import IngestConfig

    for what, folder in (("input", input_dir), ("reference", reference_dir)):
        if not Path(folder).exists():
            raise SourceError(
                f"{what} folder not found: {os.fspath(folder)}",
                code="source_not_found",
                hint="usage: voxlake verify INPUT_DIR REFERENCE_DIR (both must exist)",
            )
    base = config or IngestConfig(dashboard_address=":0")
    if not base.secret:
        base = replace(base, secret=secrets.token_hex(16))
    plans = list(_plans(Path(input_dir), Path(reference_dir)))
    root = Path(reference_dir)
    given = Path(input_dir).resolve()
    report = VerifyReport()
    with tempfile.TemporaryDirectory(prefix="voxlake-verify-", dir=workdir) as tmp:
        cache: dict[tuple[Path, bool], _Ingested] = {}
        with dask_client(base, client=client) as dask:
            for plan in plans:
                key = (plan.source, plan.precise)
                if key not in cache:
                    scaling: Literal["display", "precise"] = (
                        "precise" if plan.precise else "display"
                    )
                    config_for = replace(base, philips_scaling=scaling)
                    cache[key] = _ingest(plan.source, config_for, dask, Path(tmp))
                label = str(plan.reference.relative_to(root))
                result = _evaluate(plan.reference, label, plan.source, cache[key])
                own = plan.source.resolve() != given
                report.results.append(replace(result, own_input=own))
    return report
