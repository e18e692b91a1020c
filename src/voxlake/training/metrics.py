"""Binary classification metrics in plain numpy, and the training-curve figure."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["average_ranks", "binary_metrics", "roc_auc", "write_curves"]


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` with ties given the mean of the ranks they span."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start of each run of equal values, and the run each sorted position belongs to.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], values.size]
    run_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    run_of = np.repeat(np.arange(starts.size), ends - starts)
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = run_rank[run_of]
    return ranks


def roc_auc(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half).

    Parameters
    ----------
    labels
        Binary labels (values >= 0.5 are positive).
    scores
        Scores or probabilities; higher means more likely positive.

    Returns
    -------
    float
        AUC in [0, 1], or NaN when only one class is present.
    """
    y = np.asarray(labels, dtype=np.float64).reshape(-1) >= 0.5
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.size != s.size:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    positives = int(y.sum())
    negatives = int(y.size - positives)
    if positives == 0 or negatives == 0:
        return math.nan
    rank_sum = float(average_ranks(s)[y].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def binary_metrics(
    labels: np.ndarray, probabilities: np.ndarray, losses: np.ndarray
) -> dict[str, float]:
    """Mean loss, accuracy (threshold 0.5) and ROC AUC of per-sample results.

    Returns NaN for every metric when there are no samples.
    """
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    losses = np.asarray(losses, dtype=np.float64).reshape(-1)
    if labels.size == 0:
        return {"loss": math.nan, "accuracy": math.nan, "auc": math.nan, "count": 0.0}
    accuracy = float(np.mean((probabilities >= 0.5) == (labels >= 0.5)))
    return {
        "loss": float(losses.mean()),
        "accuracy": accuracy,
        "auc": roc_auc(labels, probabilities),
        "count": float(labels.size),
    }


def write_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Plot loss and accuracy per epoch (train and validation) to a PNG file.

    ``history`` rows hold ``epoch`` and ``train`` / ``validation`` metric dictionaries.
    Uses matplotlib's Agg canvas directly, so no global backend is switched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(figure)
    epochs = [int(row["epoch"]) for row in history]
    for position, metric in enumerate(("loss", "accuracy"), start=1):
        axes = figure.add_subplot(1, 2, position)
        for part in ("train", "validation"):
            values = [float(row.get(part, {}).get(metric, math.nan)) for row in history]
            axes.plot(epochs, values, marker="o", label=part)
        axes.set_xlabel("epoch")
        axes.set_ylabel(metric)
        axes.legend()
    figure.tight_layout()
    figure.savefig(os.fspath(path), format="png")
