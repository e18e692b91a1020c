"""The notebooks are committed without outputs, run top to bottom, and draw what they promise."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_torch

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
BIN = Path(sys.executable).parent

#: The pictures each notebook promises, saved under its work folder.
PICTURES = {
    "01_ingest.ipynb": ["01_first_look.png"],
    "02_explore_catalog.ipynb": [
        "02_counts.png",
        "02_spacing.png",
        "02_chest_soft.png",
        "02_chest_lung.png",
        "02_chest_montage.png",
        "02_feet_first.png",
        "02_mr.png",
        "02_mr_coronal_montage.png",
    ],
    "03_train_from_stream.ipynb": ["03_batch.png", "03_steps.png", "03_curves.png"],
}


def test_the_notebooks_are_the_promised_ones():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(PICTURES)


@pytest.mark.parametrize("name", sorted(PICTURES))
def test_notebooks_are_committed_without_outputs(name):
    notebook = json.loads((NOTEBOOKS / name).read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{name}: strip outputs (see notebooks/README.md)"
            assert cell["execution_count"] is None, name
    assert "widgets" not in notebook["metadata"]
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"


def execute(path: Path) -> dict:
    """Run a notebook in its folder with the test interpreter's kernel; return it run."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    nbformat.write(notebook, path)  # the run copy, for a human to look at on failure
    return notebook


def outputs(notebook: dict, kind: str) -> list[str]:
    found = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            if kind in output.get("data", {}):
                found.append(output["data"][kind])
            elif kind == "text/plain" and output.get("output_type") == "stream":
                found.append(output["text"])
    return found


def check_picture(path: Path) -> None:
    from PIL import Image

    assert path.exists(), f"{path.name} was not drawn"
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert width >= 400 and height >= 200, path.name
    assert pixels.std() > 15, f"{path.name} looks blank"


@pytest.fixture
def kernel_path(monkeypatch):
    # The python3 kernelspec runs `python` from PATH: make it this environment's.
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("VOXLAKE_SECRET", raising=False)  # the notebooks bring their own


@needs_torch  # the third notebook trains
@pytest.mark.slow
@pytest.mark.integration
def test_notebooks_run_in_order_and_draw_every_picture(tmp_path, kernel_path):
    for name in sorted(PICTURES):
        shutil.copy(NOTEBOOKS / name, tmp_path / name)
    run = {name: execute(tmp_path / name) for name in sorted(PICTURES)}
    work = tmp_path / "work"

    for name, pictures in PICTURES.items():
        for picture in pictures:
            check_picture(work / picture)
        # Every saved picture is also shown in the notebook itself.
        assert len(outputs(run[name], "image/png")) >= len(pictures), name

    text = "\n".join(outputs(run["01_ingest.ipynb"], "text/plain"))
    assert "Dask dashboard: http://" in text
    for code in ("not_dicom", "empty_file", "truncated_pixel_data", "missing_slice"):
        assert code in text, f"01 does not show the {code} failure"
    listed = re.search(r"files listed (\d+), skipped as unchanged (\d+)", text)
    assert listed and listed[1] == listed[2], "the re-run read files again"

    text = "\n".join(outputs(run["02_explore_catalog.ipynb"], "text/plain"))
    assert "0 volumes" in text and "8 volumes" in text  # the pinned old version

    metrics = json.loads((work / "train" / "metrics.json").read_text())
    assert len(metrics["history"]) == 4 and metrics["catalog_version"] is not None
    assert (work / "train" / "checkpoint.pt").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.integration
def test_explore_notebook_runs_on_its_own(tmp_path, kernel_path):
    """Opened first, notebook 2 builds the catalog it needs."""
    name = "02_explore_catalog.ipynb"
    shutil.copy(NOTEBOOKS / name, tmp_path / name)
    execute(tmp_path / name)
    for picture in PICTURES[name]:
        check_picture(tmp_path / "work" / picture)
