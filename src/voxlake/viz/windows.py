"""Display windows: CT presets in Hounsfield units, percentiles, or any level and width."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from voxlake.errors import ConfigError

__all__ = ["WINDOWS", "resolve_window"]

#: CT display windows in Hounsfield units: name -> (level, width).
WINDOWS: dict[str, tuple[float, float]] = {
    "ct-soft": (40.0, 400.0),
    "ct-lung": (-600.0, 1500.0),
    "ct-bone": (400.0, 1800.0),
    "ct-brain": (40.0, 80.0),
}


def resolve_window(
    window: str | tuple[float, float] | None,
    *,
    units: str = "",
    data: np.ndarray | Sequence[np.ndarray] | None = None,
    intensity_range: tuple[float, float] | None = None,
) -> tuple[float, float, str]:
    """Turn a window choice into display limits.

    Parameters
    ----------
    window
        A name from :data:`WINDOWS` (``"ct-soft"``, ``"ct-lung"``, ``"ct-bone"``,
        ``"ct-brain"``), ``"auto"`` (1st to 99th percentile), a ``(level, width)`` pair,
        or None: ``"ct-soft"`` for values in HU, ``"auto"`` otherwise.
    units
        Units of the values; CT presets need ``"HU"``.
    data
        Values to take percentiles of for ``"auto"`` when ``intensity_range`` is None.
    intensity_range
        Precomputed (p01, p99), e.g. the catalog's ``intensity_p01`` / ``intensity_p99``.

    Returns
    -------
    tuple
        ``(vmin, vmax, label)`` where ``label`` describes the window for captions.
    """
    if window is None:
        window = "ct-soft" if units == "HU" else "auto"
    if isinstance(window, str):
        if window == "auto":
            if intensity_range is not None and all(map(math.isfinite, intensity_range)):
                low, high = float(intensity_range[0]), float(intensity_range[1])
            else:
                parts = [data] if isinstance(data, np.ndarray) else list(data or [])
                values = np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in parts])
                values = values[np.isfinite(values)]
                if values.size == 0:
                    low, high = 0.0, 1.0
                else:
                    low, high = (float(v) for v in np.percentile(values, [1.0, 99.0]))
            if high <= low:
                high = low + 1.0
            return low, high, f"auto ({low:.4g} to {high:.4g})"
        if window not in WINDOWS:
            raise ConfigError(
                f"unknown window {window!r}",
                code="bad_window",
                hint=f"use one of {', '.join([*WINDOWS, 'auto'])} or a (level, width) pair",
            )
        level, width = WINDOWS[window]
        label = f"{window} (L {level:g}, W {width:g})"
    else:
        level, width = (float(v) for v in window)
        if width <= 0:
            raise ConfigError(f"window width must be positive, got {width}", code="bad_window")
        label = f"L {level:g}, W {width:g}"
    return level - width / 2.0, level + width / 2.0, label
