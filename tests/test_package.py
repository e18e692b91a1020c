"""Every module of the package imports, and every name its ``__all__`` lists exists."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys

import pytest

import voxlake
from tests.conftest import needs_torch

#: voxlake.training and its modules (the train extra), listed without importing them: the
#: package needs torch.
_TRAINING_DIRS = [os.path.join(path, "training") for path in voxlake.__path__]
TRAINING = [
    "voxlake.training",
    *sorted(f"voxlake.training.{info.name}" for info in pkgutil.iter_modules(_TRAINING_DIRS)),
]
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(voxlake.__path__, prefix="voxlake.")
    if info.name not in TRAINING
)


def test_the_walk_finds_the_package() -> None:
    assert {"voxlake.ingest.header_json", "voxlake.volumes.sharded"} <= set(MODULES)
    assert {"voxlake.training.datasets", "voxlake.training.train"} <= set(TRAINING)


def _check_public_names(name: str) -> None:
    module = importlib.import_module(name)
    missing = [n for n in getattr(module, "__all__", ()) if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ lists {missing}"


@pytest.mark.parametrize("name", MODULES)
def test_public_names_resolve(name: str) -> None:
    _check_public_names(name)


@needs_torch
@pytest.mark.parametrize("name", TRAINING)
def test_training_public_names_resolve(name: str) -> None:
    _check_public_names(name)


def test_training_without_torch_names_the_extra() -> None:
    """Without torch, importing voxlake.training (or `voxlake train`) says which extra to
    install, while ingest and the catalog import as before."""
    script = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # as if torch were not installed
        "import voxlake.ingest, voxlake.catalog, voxlake.cli\n"
        "from voxlake.errors import MissingExtraError\n"
        "try:\n"
        "    import voxlake.training.datasets\n"
        "except MissingExtraError as exc:\n"
        "    assert isinstance(exc, ImportError) and exc.code == 'missing_extra'\n"
        "    print(exc.hint)\n"
        "else:\n"
        "    raise SystemExit('imported without torch')\n"
        "from voxlake.cli import main\n"
        "main(['train', '--catalog', 'nowhere', '--out', 'nowhere'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stdout + result.stderr
    hint = "pip install 'voxlake[train]'"
    assert hint in result.stdout  # the exception's hint
    cli = result.stderr  # the CLI's one-line error and hint
    assert "[missing_extra] voxlake.training needs PyTorch" in cli
    assert "hint: install torch first" in cli and hint in cli
    assert "Traceback" not in cli
