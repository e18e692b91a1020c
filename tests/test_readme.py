"""The README's commands work as written (and every `voxlake` line in the docs parses)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def code_blocks(text: str, lang: str = "bash") -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def walkthrough() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Walkthrough", 1)[1]
    (block,) = code_blocks(section)[:1]
    return [line for line in block.splitlines() if line.strip()]


def voxlake_lines() -> list[tuple[str, str]]:
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    found = []
    for doc in docs:
        for block in code_blocks(doc.read_text()):
            for line in block.splitlines():
                if line.startswith("voxlake "):
                    found.append((doc.name, line.split("#", 1)[0].strip()))
    return found


@needs_torch  # the walkthrough ends with `voxlake train`
@pytest.mark.slow
@pytest.mark.integration
def test_walkthrough_runs_exactly_as_written(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    lines = walkthrough()
    assert any(line.startswith("voxlake ingest") for line in lines)
    for line in lines:
        if line.startswith("export "):
            name, value = line[len("export ") :].split("=", 1)
            env[name] = shlex.split(value)[0]
            continue
        result = subprocess.run(
            line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
    # The walkthrough's outputs exist and hold what it claims.
    from voxlake.catalog import open_catalog

    catalog = open_catalog(tmp_path / "out" / "catalog")
    assert len(catalog.volumes) > 0
    assert len(catalog.training_selection("label")) == len(catalog.volumes)
    for name in ("checkpoint.pt", "metrics.json", "curves.png"):
        assert (tmp_path / "out" / "train" / name).stat().st_size > 0


@pytest.mark.parametrize(("doc", "line"), voxlake_lines())
def test_documented_commands_parse(doc, line):
    """Every documented command names a real command and only options it accepts."""
    import typer.main

    from voxlake.cli import app

    command = typer.main.get_command(app)
    args = shlex.split(line)[1:]
    ctx_args = [a for a in args if a != "--help"]
    if args and ctx_args in ([], ["--version"]):
        return  # `voxlake --help`, `voxlake --version`
    # Walk the command tree, then let click parse the arguments without running anything.
    # typer >= 0.20 vendors click: its groups are not click.Group, so look for `commands`.
    current, rest = command, ctx_args
    while hasattr(current, "commands") and rest and rest[0] in current.commands:
        current, rest = current.commands[rest[0]], rest[1:]
    assert not hasattr(current, "commands"), f"{doc}: {line!r} names no command"
    placeholder = [re.sub(r"[A-Z]+\.\.\.", "x", a) for a in rest]
    if any(re.fullmatch(r"\[.*\]|[A-Z_|\\]+|\.\.\.", a) for a in placeholder):
        pytest.skip("synopsis with placeholders")  # tables in prose, not runnable lines
    ctx = current.make_context(current.name, placeholder, resilient_parsing=False)
    assert ctx is not None


def test_readme_configuration_example_loads(tmp_path):
    from voxlake.config import load_config

    readme = (REPO / "README.md").read_text()
    (block,) = code_blocks(readme.split("## Configuration", 1)[1], "toml")[:1]
    path = tmp_path / "voxlake.toml"
    path.write_text(block)
    config = load_config(path, env={})
    assert config.preprocess.target_spacing == (1.0, 1.0, 1.0)
    assert config.deid.date_mode == "shift"
    assert config.store.codec == "blosc-zstd"


def test_readme_worker_malloc_settings_match_the_local_clusters():
    """The YAML shown for self-started clusters is what the local cluster sets."""
    import yaml

    from voxlake.cluster import WORKER_MALLOC_ENV

    readme = (REPO / "README.md").read_text()
    (block,) = code_blocks(readme.split("## Run on a cluster", 1)[1].split("\n## ", 1)[0], "yaml")
    shown = yaml.safe_load(block)["distributed"]["nanny"]["pre-spawn-environ"]
    assert shown == WORKER_MALLOC_ENV
