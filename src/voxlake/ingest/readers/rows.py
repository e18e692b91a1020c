"""The ``volumes`` catalog row of a built volume (shared by every reader)."""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from voxlake.ingest.geometry import axis_codes
from voxlake.volumes.layout import volume_path

if TYPE_CHECKING:
    from voxlake.ingest.series import VolumePlan
    from voxlake.volumes.writer import WriteResult

__all__ = ["volume_row"]


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def volume_row(
    plan: VolumePlan,
    result: WriteResult | None,
    attrs: dict[str, Any],
    *,
    run_id: str,
) -> dict[str, Any]:
    """The ``volumes`` row of a written volume.

    ``plan.metadata`` supplies the descriptive columns (modality, descriptions...) and the
    assembly columns (layout, value_scaling, echo_times, b_values, ...).
    """
    stats = result.stats.__dict__ if result is not None else attrs["stats"]
    affine = np.array(plan.affine).reshape(4, 4)
    slopes = {s.slope for s in plan.slices}
    intercepts = {s.intercept for s in plan.slices}
    meta = dict(plan.metadata)
    study_date = meta.pop("study_date", None)
    if study_date is not None and not isinstance(study_date, dt.date):
        study_date = None
    n_t = plan.shape[0] if plan.dims == "tzyx" else 1
    return {
        "volume_id": plan.volume_id,
        "revision": plan.revision,
        "patient_key": plan.patient_key or None,
        "study_key": plan.study_key or None,
        "series_key": plan.series_key,
        "split_key": plan.split_key,
        "split_reason": plan.split_reason,
        **{k: _clean(v) for k, v in meta.items()},
        "study_date": study_date,
        "ndim": len(plan.shape),
        "axes": plan.dims,
        "shape": list(plan.shape),
        "spacing": list(plan.spacing),
        "affine": list(plan.affine),
        "orientation": "".join(code or "" for code in axis_codes(affine)),
        "dtype": plan.dtype,
        "units": plan.units,
        "rescale_slope": slopes.pop() if len(slopes) == 1 else float("nan"),
        "rescale_intercept": intercepts.pop() if len(intercepts) == 1 else float("nan"),
        "n_instances": len({s.instance_key for s in plan.slices}),
        "n_slices": plan.shape[-3],
        "n_timepoints": n_t,
        **plan.geometry,
        "decoder": attrs.get("decoder", ""),
        "source_instance_keys": [s.instance_key for s in plan.slices],
        "source_hashes": [s.content_hash for s in plan.slices],
        "source_frames": [s.frame for s in plan.slices],
        "store_url": attrs.get("store_url", result.store_url if result else ""),
        "store_path": volume_path(plan.volume_id, plan.revision),
        "nbytes": math.prod(plan.shape) * np.dtype(plan.dtype).itemsize,
        "stored_bytes": result.stored_bytes if result else attrs.get("stored_bytes", 0),
        "chunks": list(result.chunks) if result else attrs.get("chunks", []),
        "shards": list(result.shards) if result else attrs.get("shards", []),
        "intensity_min": stats["min"],
        "intensity_max": stats["max"],
        "intensity_mean": stats["mean"],
        "intensity_std": stats["std"],
        "intensity_p01": stats["p01"],
        "intensity_p50": stats["p50"],
        "intensity_p99": stats["p99"],
        "intensity_non_finite": int(stats.get("non_finite", 0)),  # not in older stores
        "preprocessing": json.dumps(attrs.get("preprocessing", [])),
        "run_id": run_id,
        "ingested_at": dt.datetime.now(dt.UTC),
    }
