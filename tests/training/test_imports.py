from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

MODULES = [
    "voxlake.training",
    "voxlake.training.world",
    "voxlake.training.partition",
    "voxlake.training.patches",
    "voxlake.training.datasets",
    "voxlake.training.collate",
    "voxlake.training.transforms",
    "voxlake.training.models",
    "voxlake.training.split",
    "voxlake.training.metrics",
    "voxlake.training.train",
    "voxlake.volumes.cache",
    "voxlake.volumes.counting",
    "voxlake.volumes.foreground",
    "voxlake.volumes.patches",
    "voxlake.volumes.retry",
    "voxlake.volumes.sharded",
]


def test_training_imports_no_ingest_dask_or_pydicom() -> None:
    code = (
        "import sys, voxlake.training, voxlake.training.train\n"
        "banned = ('dask', 'distributed', 'pydicom', 'voxlake.ingest', 'voxlake.catalog')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in banned[:3]"
        " or m.startswith(banned[3:])))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("name", MODULES)
def test_all_names_resolve(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__all__ == sorted(module.__all__) or name == "voxlake.training"
    for attr in module.__all__:
        assert getattr(module, attr) is not None
