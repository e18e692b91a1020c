"""Every module of the package imports, and every name its ``__all__`` lists exists."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import voxlake

MODULES = sorted(info.name for info in pkgutil.walk_packages(voxlake.__path__, prefix="voxlake."))


def test_the_walk_finds_the_package() -> None:
    assert {"voxlake.ingest.header_json", "voxlake.volumes.sharded"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_public_names_resolve(name: str) -> None:
    module = importlib.import_module(name)
    missing = [n for n in getattr(module, "__all__", ()) if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ lists {missing}"
