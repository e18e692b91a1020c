from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from voxlake.training import binary_metrics, roc_auc


def pairwise_auc(labels: list[int], scores: list[float]) -> float:
    pos = [s for y, s in zip(labels, scores, strict=True) if y]
    neg = [s for y, s in zip(labels, scores, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 5)), min_size=2, max_size=40))
def test_auc_matches_pairwise_definition_with_ties(pairs: list[tuple[int, int]]) -> None:
    labels = [y for y, _ in pairs]
    scores = [float(s) for _, s in pairs]
    if len(set(labels)) < 2:
        assert math.isnan(roc_auc(labels, scores))
    else:
        assert roc_auc(labels, scores) == pytest_approx(pairwise_auc(labels, scores))


def pytest_approx(value: float) -> object:
    import pytest

    return pytest.approx(value, abs=1e-12)


def test_binary_metrics() -> None:
    metrics = binary_metrics(
        np.array([0.0, 1.0, 1.0, 0.0]), np.array([0.2, 0.9, 0.4, 0.1]), np.array([1.0, 2, 3, 4])
    )
    assert metrics == {"loss": 2.5, "accuracy": 0.75, "auc": 1.0, "count": 4.0}
    assert math.isnan(binary_metrics(np.zeros(0), np.zeros(0), np.zeros(0))["loss"])
