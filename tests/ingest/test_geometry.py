"""Geometry helpers checked against nibabel, their reference."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np

from voxlake.ingest.geometry import axis_codes


def _affines() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    out = []
    # Every axis permutation and flip, with anisotropic spacing.
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((-1.0, 1.0), repeat=3):
            matrix = np.zeros((4, 4))
            for axis, (world, sign) in enumerate(zip(perm, signs, strict=True)):
                matrix[world, axis] = sign * (0.5 + axis)
            matrix[3, 3] = 1
            out.append(matrix)
    # Oblique, sheared, near-tie and random affines.
    for _ in range(300):
        matrix = np.eye(4)
        matrix[:3, :3] = rng.normal(size=(3, 3)) * rng.uniform(0.2, 3, size=3)
        matrix[:3, 3] = rng.normal(size=3) * 100
        out.append(matrix)
    angle = np.pi / 4  # a 45 degree tie between two world axes
    tie = np.eye(4)
    tie[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    out.append(tie)
    rank_two = np.eye(4)
    rank_two[:3, 2] = 0  # a zero column: that axis has no direction
    out.append(rank_two)
    return out


def test_axis_codes_match_nibabel() -> None:
    affines = _affines()
    mismatches = [
        i for i, a in enumerate(affines) if axis_codes(a) != nib.orientations.aff2axcodes(a)
    ]
    assert not mismatches, [affines[i] for i in mismatches[:3]]
    assert nib.orientations.aff2axcodes(affines[-1])[2] is None  # the rank-2 case is covered


def test_axis_codes_of_a_plain_dicom_axial_stack() -> None:
    # LPS rows/columns of an axial CT, as an RAS affine: i toward L, j toward P, k toward S.
    affine = np.diag([-0.7, -0.7, 2.5, 1.0])
    assert "".join(axis_codes(affine)) == "LPS"  # type: ignore[arg-type]
