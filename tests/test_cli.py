"""The console script as shells and CI jobs run it: its exit codes.

typer's test runner runs commands in standalone mode, where a command's ``typer.Exit(1)``
exits with 1; the installed ``voxlake`` entry point does not run in that mode, so these
run the real script in a subprocess.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _voxlake() -> list[str]:
    script = Path(sys.executable).with_name("voxlake")
    return [str(script)] if script.exists() else [shutil.which("voxlake") or "voxlake"]


def test_verify_exits_1_when_a_reference_does_not_match(tmp_path):
    import nibabel as nib

    source, reference = tmp_path / "in", tmp_path / "ref"
    source.mkdir(), reference.mkdir()
    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), source / "a.nii.gz")
    for name, data in (("match", volume), ("mismatch", volume + 1)):
        folder = reference / name
        folder.mkdir()
        nib.save(nib.Nifti1Image(data, np.eye(4)), folder / "a.nii.gz")
    runs = {}
    for name in ("match", "mismatch"):
        command = [*_voxlake(), "verify", str(source), str(reference / name), "--workers", "1"]
        runs[name] = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert runs["match"].returncode == 0, runs["match"].stdout + runs["match"].stderr
    assert "matched 1 of 1" in runs["match"].stdout
    assert runs["mismatch"].returncode == 1, runs["mismatch"].stdout + runs["mismatch"].stderr
    assert "matched 0 of 1" in runs["mismatch"].stdout
