"""Pictures: orientation, physical aspect ratios, windows, PNG output, the `show` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxlake.errors import ConfigError
from voxlake.viz import (
    WINDOWS,
    display_orientation,
    load_volume,
    plot_montage,
    plot_triplanar,
    resolve_window,
    save_figure,
    show_volume,
)

BIN = Path(sys.executable).parent

# RAS affines of (i, j, k): what voxlake stores for common acquisitions.
HEAD_FIRST_AXIAL = np.diag([-0.7, -0.7, 2.0, 1.0])  # i -> L, j -> P, k -> S ("LPS")
FEET_FIRST_AXIAL = np.diag([0.7, -0.7, -2.0, 1.0])  # i -> R, j -> P, k -> I ("RPI")
SAGITTAL = np.array(  # i -> A, j -> I, k -> L: a sagittal stack
    [[0.0, 0.0, -3.0, 0.0], [0.9, 0.0, 0.0, 0.0], [0.0, -0.9, 0.0, 0.0], [0, 0, 0, 1.0]]
)


def panels(figure):
    """The image panels of a figure by label (the colour bar left out)."""
    return {axes.get_label(): axes for axes in figure.axes if axes.get_label() != "colorbar"}


def image_of(axes) -> np.ndarray:
    return np.asarray(axes.images[0].get_array())


def world_volume(shape, affine, component):
    """A volume whose voxels hold one RAS coordinate (mm) of their own centre."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(float)
    return (ijk1 @ np.asarray(affine).T)[..., component]


# --------------------------------------------------------------------------- orientation
def test_display_orientation_of_common_acquisitions():
    # Array axes are (k, j, i); display axes 0 S->I, 1 A->P, 2 R->L.
    assert display_orientation(HEAD_FIRST_AXIAL) == ((0, 1, 2), (1, 0, 0))
    assert display_orientation(FEET_FIRST_AXIAL) == ((0, 1, 2), (0, 0, 1))
    assert display_orientation(SAGITTAL) == ((2, 0, 1), (0, 0, 1))
    assert display_orientation(HEAD_FIRST_AXIAL.ravel().tolist()) == display_orientation(
        HEAD_FIRST_AXIAL
    )


def test_display_orientation_refuses_a_degenerate_affine():
    with pytest.raises(ConfigError):
        display_orientation(np.diag([1.0, 0.0, 1.0, 1.0]))


signed_permutations = st.tuples(
    st.permutations([0, 1, 2]),
    st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3),
    st.tuples(*[st.sampled_from([0.5, 1.0, 2.5])] * 3),
    st.tuples(*[st.floats(-0.25, 0.25)] * 3),  # a small oblique tilt
)


def affine_from(perm, signs, steps, tilt):
    rotation = np.zeros((3, 3))
    for column, (axis, sign) in enumerate(zip(perm, signs, strict=True)):
        rotation[axis, column] = sign
    ax, ay, az = tilt
    tilt_x = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    tilt_y = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    tilt_z = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = tilt_x @ tilt_y @ tilt_z @ rotation @ np.diag(steps)
    affine[:3, 3] = (10.0, -20.0, 30.0)
    return affine


@settings(max_examples=40, deadline=None)
@given(signed_permutations)
def test_every_panel_follows_the_radiological_convention(params):
    """Whatever the acquisition, axial rows run A->P and columns R->L; coronal and sagittal
    rows run S->I; sagittal columns run A->P (checked on voxels holding their own RAS mm)."""
    affine = affine_from(*params)
    shape = (5, 6, 7)
    x, y, z = (world_volume(shape, affine, c) for c in range(3))

    def planes(volume):
        figure = plot_triplanar(volume, affine=affine, window=(0.0, 1e4), width=6.0)
        return {name: image_of(axes) for name, axes in panels(figure).items()}

    px, py, pz = planes(x), planes(y), planes(z)
    # R is +x, A is +y, S is +z: coordinates fall along the display directions.
    assert np.all(np.diff(py["axial"], axis=0) < 0)  # rows anterior -> posterior
    assert np.all(np.diff(px["axial"], axis=1) < 0)  # columns right -> left
    assert np.all(np.diff(pz["coronal"], axis=0) < 0)  # rows superior -> inferior
    assert np.all(np.diff(px["coronal"], axis=1) < 0)  # columns right -> left
    assert np.all(np.diff(pz["sagittal"], axis=0) < 0)  # rows superior -> inferior
    assert np.all(np.diff(py["sagittal"], axis=1) < 0)  # columns anterior -> posterior


def test_a_plain_array_is_taken_as_a_head_first_axial_stack():
    volume = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    figure = plot_triplanar(volume, (2.0, 1.0, 1.0), window=(0.0, 1e3))
    shown = panels(figure)
    np.testing.assert_array_equal(image_of(shown["axial"]), volume[2])
    # Slices are stored inferior -> superior: the coronal panel puts the last one on top.
    np.testing.assert_array_equal(image_of(shown["coronal"]), volume[::-1, 2, :])
    np.testing.assert_array_equal(image_of(shown["sagittal"]), volume[::-1, :, 3])


# --------------------------------------------------------------------------- geometry
def test_panels_have_the_physical_aspect_ratio_and_one_scale():
    shape, spacing = (10, 40, 60), (5.0, 0.8, 0.5)  # thick slices, anisotropic pixels
    figure = plot_triplanar(np.random.default_rng(0).normal(size=shape), spacing)
    figure.canvas.draw()
    si, ap, rl = (n * s for n, s in zip(shape, spacing, strict=True))  # 50, 32, 30 mm
    expected = {"axial": (ap, rl), "coronal": (si, rl), "sagittal": (si, ap)}
    scales = []
    for name, (height_mm, width_mm) in expected.items():
        box = panels(figure)[name].get_window_extent()
        assert box.height / box.width == pytest.approx(height_mm / width_mm, rel=0.02), name
        scales.append(box.width / width_mm)
    # Same pixels per millimetre in every panel: sizes compare across panels too.
    assert max(scales) / min(scales) == pytest.approx(1.0, abs=0.03)


def test_index_and_time_point_choose_what_is_drawn():
    volume = np.zeros((3, 4, 5, 6), dtype=np.float32)
    for t in range(3):
        volume[t] = t * 100 + np.arange(4)[:, None, None]
    figure = plot_triplanar(volume, (1.0, 1.0, 1.0), t=2, index=(1, 2, 3), window=(0, 1e3))
    np.testing.assert_array_equal(image_of(panels(figure)["axial"]), volume[2, 1])
    assert "t=2" in figure.get_suptitle()
    with pytest.raises(ConfigError, match="time point 3"):
        plot_triplanar(volume, (1.0, 1.0, 1.0), t=3)
    with pytest.raises(ConfigError, match="outside"):
        plot_triplanar(volume[0], (1.0, 1.0, 1.0), index=(4, 0, 0))


def test_a_colour_volume_is_drawn_in_rgb_not_as_time_points():
    from voxlake.viz import VolumeView

    rgb = np.zeros((3, 4, 5, 6), dtype=np.uint8)
    rgb[0, 1] = 255  # slice k=1 pure red, slice k=2 mid grey, the rest black
    rgb[:, 2] = 128
    view = VolumeView(rgb, (1.0, 1.0, 1.0), np.diag([-1.0, -1.0, 1.0, 1.0]), axes="czyx")
    figure = plot_triplanar(view, index=(1, 2, 3))
    axial = image_of(panels(figure)["axial"])
    assert axial.shape == (5, 6, 3)  # rows, columns, RGB
    np.testing.assert_array_equal(axial, np.broadcast_to([1.0, 0.0, 0.0], (5, 6, 3)))
    assert "t=" not in figure.get_suptitle() and "RGB" in figure.get_suptitle()
    tiles = plot_montage(view, n_slices=4).axes
    grey = next(a for a in tiles if a.get_label() == "slice 2")
    np.testing.assert_allclose(image_of(grey), 128 / 255)
    # Two channels cannot be colour: a clear error, not a guess.
    with pytest.raises(ConfigError, match="3 or 4 channels"):
        plot_triplanar(VolumeView(rgb[:2], (1.0, 1.0, 1.0), np.eye(4), axes="czyx"))


def test_montage_picks_evenly_spaced_slices_superior_first():
    volume = np.arange(20, dtype=np.float32)[:, None, None] * np.ones((20, 8, 8))
    figure = plot_montage(volume, (2.0, 1.0, 1.0), n_slices=5, window=(0.0, 40.0))
    tiles = [a for a in figure.axes if a.get_label().startswith("slice ")]
    assert [a.get_label() for a in tiles] == [f"slice {k}" for k in (19, 14, 9, 5, 0)]
    assert [float(image_of(a).mean()) for a in tiles] == [19.0, 14.0, 9.0, 5.0, 0.0]
    assert len(plot_montage(volume[:3], (2.0, 1.0, 1.0), n_slices=12).axes) == 3 + 1


# --------------------------------------------------------------------------- windows
def test_windows():
    assert resolve_window("ct-lung")[:2] == (-1350.0, 150.0)
    assert resolve_window(None, units="HU")[:2] == (-160.0, 240.0)  # ct-soft
    assert resolve_window((40.0, 80.0))[:2] == (0.0, 80.0)
    assert resolve_window(None, units="", intensity_range=(3.0, 900.0))[:2] == (3.0, 900.0)
    low, high, label = resolve_window("auto", data=np.arange(101.0))
    assert (low, high) == (1.0, 99.0) and label.startswith("auto")
    assert set(WINDOWS) == {"ct-soft", "ct-lung", "ct-bone", "ct-brain"}
    with pytest.raises(ConfigError) as info:
        resolve_window("ct-liver")
    assert info.value.code == "bad_window" and "ct-soft" in (info.value.hint or "")
    with pytest.raises(ConfigError):
        resolve_window((40.0, 0.0))


# --------------------------------------------------------------------------- files
def png_pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("L"), dtype=np.float64)


def test_save_figure_writes_a_png_of_the_promised_size(tmp_path):
    volume = np.random.default_rng(1).normal(size=(12, 30, 40))
    figure = plot_triplanar(volume, (3.0, 1.0, 1.0), window="auto", width=10.0)
    path = save_figure(figure, tmp_path / "sub" / "view.png", dpi=80)
    pixels = png_pixels(Path(path))
    width, height = figure.get_size_inches() * 80
    assert pixels.shape == (round(height), round(width))
    assert pixels.std() > 20  # not a blank canvas


def test_library_leaves_pyplot_and_the_backend_alone(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from voxlake.viz import plot_triplanar, save_figure\n"
        "save_figure(plot_triplanar(np.zeros((4, 5, 6))), sys.argv[1])\n"
        "# No pyplot: no global figure registry, no backend selection, no GUI.\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "for name in ('dask', 'distributed', 'pydicom', 'voxlake.ingest', 'torch'):\n"
        "    assert name not in sys.modules, name\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "view.png")], check=True)


# --------------------------------------------------------------------------- catalog
@pytest.mark.slow
@pytest.mark.integration
def test_show_volume_draws_the_stored_voxels(tiny_ingested, tmp_path):
    from voxlake.catalog import open_catalog
    from voxlake.volumes import read_volume

    _, catalog, _, _ = tiny_ingested
    volumes = open_catalog(catalog).volumes
    row = volumes[(volumes.orientation == "LPS") & (volumes.modality == "CT")].iloc[0]
    out = tmp_path / "view.png"
    figure = show_volume(catalog, row.volume_id[:10], window="ct-soft", out=out)
    data, _ = read_volume(row.store_url, row.store_path)
    axial = image_of(panels(figure)["axial"])
    np.testing.assert_array_equal(axial, data[data.shape[0] // 2])
    assert row.series_description in figure.get_suptitle()
    assert "ct-soft" in figure.get_suptitle()
    pixels = png_pixels(out)
    assert pixels.shape == (round(figure.get_size_inches()[1] * 100), 1200)
    assert pixels.std() > 30 and (pixels < 128).mean() > 0.1  # dark background, bright body


@pytest.mark.slow
@pytest.mark.integration
def test_feet_first_and_head_first_chests_look_the_same_way_round(tiny_ingested):
    _, catalog, _, _ = tiny_ingested
    from voxlake.catalog import open_catalog

    volumes = open_catalog(catalog).volumes
    chests = volumes[volumes.body_part_examined == "CHEST"]
    views = {
        orientation: load_volume(
            catalog, chests[chests.orientation == orientation].volume_id.iloc[0]
        )
        for orientation in ("LPS", "RPI")
    }
    for view in views.values():
        axial = image_of(panels(plot_triplanar(view))["axial"])
        half_rows, half_cols = axial.shape[0] // 2, axial.shape[1] // 2
        # The phantom's spine is posterior: bone in the bottom half of the axial image.
        bone = axial > 300
        assert bone[half_rows:].sum() > bone[:half_rows].sum()
        # Its heart sits on the patient's left, where the lung is smaller: the image's
        # right half holds more soft tissue (radiological convention).
        tissue = axial > -500
        assert tissue[:, half_cols:].sum() > tissue[:, :half_cols].sum()


@pytest.mark.slow
@pytest.mark.integration
def test_show_command_and_its_errors(tiny_ingested, tmp_path):
    _, catalog, _, _ = tiny_ingested
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

    def voxlake(*args):
        return subprocess.run(
            ["voxlake", *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
        )

    result = voxlake("show", catalog, "--window", "ct-lung", "--montage", "--out", "m.png")
    assert result.returncode == 0, result.stderr
    assert "showing the first volume" in result.stderr
    assert png_pixels(tmp_path / "m.png").std() > 20

    result = voxlake("show", catalog, "0123456789ab")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error [volume_not_found]") and lines[1].startswith("hint:")
    assert "Traceback" not in result.stderr

    result = voxlake("show", catalog, "--window", "40;400")
    assert result.returncode == 2 and "[bad_window]" in result.stderr

    result = voxlake("--debug", "show", catalog, "0123456789ab")
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.fixture
def odd_catalog(tmp_path):
    """A catalog of one 3D volume, in folders whose names need quoting in a shell."""
    from voxlake.catalog import CatalogWriter
    from voxlake.volumes import write_volume
    from voxlake.volumes.layout import volume_path

    root = tmp_path / "odd out"
    catalog, store = root / "cat alog", root / "vol's.zarr"
    volume_id, path = "ab" * 12, volume_path("ab" * 12, "cd" * 8)
    affine = HEAD_FIRST_AXIAL.tolist()
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    write_volume(
        store, path, data, attributes={"volume_id": volume_id, "spacing": [2.0, 0.7, 0.7],
                                       "affine": affine}
    )  # fmt: skip
    row = {
        "volume_id": volume_id,
        "revision": "cd" * 8,
        "series_key": "ef" * 16,
        "modality": "MR",
        "store_url": str(store),
        "store_path": path,
        "shape": [4, 5, 6],
        "spacing": [2.0, 0.7, 0.7],
        "affine": HEAD_FIRST_AXIAL.ravel().tolist(),
        "axes": "zyx",
        "nbytes": 240,
    }
    CatalogWriter(catalog).commit({"volumes": [row]}, run_id="a", operation="t")
    return str(catalog)


def _show(*args: str) -> int:
    from voxlake.cli import main

    try:
        main(["show", *args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_show_hint_quotes_the_catalog_path(odd_catalog, tmp_path, capsys):
    import shlex

    assert _show(odd_catalog, "0123456789ab", "--out", str(tmp_path / "v.png")) == 2
    err = capsys.readouterr().err
    assert "[volume_not_found]" in err
    hint = next(line for line in err.splitlines() if line.startswith("hint:"))
    command = shlex.split(hint.split("with: ", 1)[1])
    assert command[:4] == ["voxlake", "catalog", "query", odd_catalog]
    assert command[4].startswith("SELECT volume_id") and len(command) == 5


def test_show_refuses_a_time_point_of_a_3d_volume(odd_catalog, tmp_path, capsys):
    png = str(tmp_path / "v.png")
    assert _show(odd_catalog, "--out", png) == 0  # the volume draws
    capsys.readouterr()
    assert _show(odd_catalog, "--t", "3", "--out", png) == 2
    err = capsys.readouterr().err
    assert "error [bad_time_point]" in err and "no time axis" in err


def test_show_refuses_a_dpi_below_1(odd_catalog, tmp_path, capsys):
    assert _show(odd_catalog, "--dpi", "0", "--out", str(tmp_path / "v.png")) == 2
    err = capsys.readouterr().err
    assert "--dpi" in err and "ValueError" not in err


def test_public_names_resolve():
    import importlib

    for name in ("voxlake.viz", *(f"voxlake.viz.{m}" for m in VIZ_MODULES)):
        module = importlib.import_module(name)
        assert all(hasattr(module, item) for item in module.__all__), name


VIZ_MODULES = ("catalog", "figures", "orientation", "view", "windows")


def test_a_too_short_volume_id_prefix_says_how_many_characters(odd_catalog, tmp_path, capsys):
    """`voxlake show CATALOG ababa` (a real prefix, one character short) said "no volume"."""
    with pytest.raises(ConfigError) as info:
        load_volume(odd_catalog, "ababa")
    assert info.value.code == "volume_id_too_short"
    assert "at least 6 characters" in info.value.message
    assert load_volume(odd_catalog, "ababab").volume_id == "ab" * 12
    assert _show(odd_catalog, "ababa", "--out", str(tmp_path / "v.png")) == 2
    assert "error [volume_id_too_short]" in capsys.readouterr().err


def test_the_library_hint_for_an_unknown_volume_pastes_into_a_shell(odd_catalog):
    import shlex

    from voxlake.errors import StoreError

    with pytest.raises(StoreError) as info:
        load_volume(odd_catalog, "0123456789ab")
    assert info.value.code == "volume_not_found"
    command = shlex.split(info.value.hint.split("with: ", 1)[1])
    assert command[:4] == ["voxlake", "catalog", "query", odd_catalog] and len(command) == 5


@pytest.mark.parametrize(
    ("suffix", "magic"),
    [(".jpg", b"\xff\xd8\xff"), (".JPEG", b"\xff\xd8\xff"), (".pdf", b"%PDF"),
     (".svg", b"<?xml"), ("", b"\x89PNG")],
)  # fmt: skip
def test_save_figure_writes_the_format_its_suffix_names(tmp_path, suffix, magic):
    figure = plot_triplanar(np.zeros((4, 5, 6)))
    path = Path(save_figure(figure, tmp_path / f"view{suffix}", dpi=20))
    assert path.read_bytes().startswith(magic)


def test_an_image_suffix_matplotlib_cannot_write_is_a_usage_error(odd_catalog, tmp_path, capsys):
    with pytest.raises(ConfigError) as info:
        save_figure(plot_triplanar(np.zeros((4, 5, 6))), tmp_path / "view.txt")
    assert info.value.code == "bad_image_format" and ".png" in (info.value.hint or "")
    assert _show(odd_catalog, "--out", str(tmp_path / "view.bmpx")) == 2
    assert "error [bad_image_format]" in capsys.readouterr().err
    assert not list(tmp_path.glob("view*"))
    assert _show(odd_catalog, "--out", str(tmp_path / "view.jpg")) == 0
    assert (tmp_path / "view.jpg").read_bytes().startswith(b"\xff\xd8\xff")
