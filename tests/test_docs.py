"""The docs tell the truth: generated references are current, every command shown parses,
every link resolves, every setting, variable and failure code is documented, and the CLI
answers --help with examples and errors with one line and a hint."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import needs_torch

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", REPO / "notebooks" / "README.md", *DOCS]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- helpers
def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def shown_commands() -> list[tuple[str, str]]:
    """Every `voxlake ...` line in bash blocks of the pages and notebooks, and `!voxlake`."""
    found = []
    for page in PAGES:
        for block in code_blocks(page.read_text(), "bash"):
            found += [
                (page.name, line) for line in block.splitlines() if line.startswith("voxlake ")
            ]
    for notebook in NOTEBOOKS:
        for cell in json.loads(notebook.read_text())["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] == "markdown":
                for block in code_blocks(source, "bash"):
                    lines = block.splitlines()
                    found += [(notebook.name, x) for x in lines if x.startswith("voxlake ")]
            else:
                lines = source.splitlines()
                found += [(notebook.name, x[1:]) for x in lines if x.startswith("!voxlake ")]
    return [(name, line.split(" #", 1)[0].strip()) for name, line in found]


def root_command():
    import typer.main

    from voxlake.cli import app

    return typer.main.get_command(app)


def leaf_commands():
    """(path, command) of every command that runs (groups excluded)."""
    found = []

    def walk(command, path):
        for name, child in command.commands.items():
            if hasattr(child, "commands"):
                walk(child, [*path, name])
            else:
                found.append(([*path, name], child))

    walk(root_command(), [])
    return found


def parse(line: str) -> None:
    """Parse a `voxlake ...` line with the real command tree, running nothing.

    typer >= 0.20 vendors click, so groups are recognised by their ``commands``.
    """
    args = shlex.split(line)
    assert args[0] == "voxlake"
    args = [a for a in args[1:] if a not in ("--debug", "--verbose", "-v")]
    if args in (["--version"], ["--help"]):
        return
    command = root_command()
    while hasattr(command, "commands"):
        assert args, f"{line!r} names a group, not a command"
        name, args = args[0], args[1:]
        assert name in command.commands, f"{line!r}: no command {name!r}"
        command = command.commands[name]
    command.make_context(command.name, [a for a in args if a != "--help"])


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


# --------------------------------------------------------------------------- generated pages
def test_cli_reference_is_current():
    from voxlake._docgen import render_cli_markdown

    current = (REPO / "docs" / "cli.md").read_text()
    assert current == render_cli_markdown(), "run: voxlake docs cli --out docs/cli.md"


@needs_torch  # the page documents TrainConfig too
def test_configuration_reference_is_current():
    from voxlake._docgen import render_config_markdown

    current = (REPO / "docs" / "configuration.md").read_text()
    assert current == render_config_markdown(), (
        "run: voxlake docs config --out docs/configuration.md"
    )


@needs_torch  # TrainConfig's keys among them
def test_every_configuration_key_is_described():
    from voxlake._docgen import attribute_docs
    from voxlake.config import _SECTIONS, IngestConfig
    from voxlake.training import TrainConfig

    for cls in (IngestConfig, *_SECTIONS.values(), TrainConfig):
        attribute_docs(cls)  # raises naming any field without a description
    text = (REPO / "docs" / "configuration.md").read_text()
    for cls in (IngestConfig, *_SECTIONS.values()):
        for field in cls.__dataclass_fields__:
            if field not in _SECTIONS:  # sub-tables have their own section
                assert f"| `{field}` |" in text, field


def test_the_documented_toml_is_the_defaults(tmp_path):
    from voxlake.config import IngestConfig, load_config

    (block,) = code_blocks((REPO / "docs" / "configuration.md").read_text(), "toml")
    tomllib.loads(block)
    path = tmp_path / "voxlake.toml"
    path.write_text(block)
    assert load_config(path, env={}) == IngestConfig()


def test_every_voxlake_variable_is_documented():
    text = (REPO / "docs" / "configuration.md").read_text()
    read = [  # os.environ.get("X"), os.environ["X"], os.getenv("X"), X_ENV = "X", {"X": (
        r"environ(?:\.get\(|\[)\s*[\"'](VOXLAKE_[A-Z_]+)",
        r"getenv\(\s*[\"'](VOXLAKE_[A-Z_]+)",
        r"_ENV\w*\s*=\s*[\"'](VOXLAKE_[A-Z_]+)",
        r"[\"'](VOXLAKE_[A-Z_]+)[\"']\s*:\s*\(",
    ]
    names = set()
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "tests").rglob("conftest.py")]:
        source = path.read_text()
        for pattern in read:
            names |= set(re.findall(pattern, source))
    assert {"VOXLAKE_SECRET", "VOXLAKE_WORKERS", "VOXLAKE_STORAGE_OPTIONS"} <= names
    assert not {n for n in names if f"`{n}`" not in text}


def test_every_failure_code_is_explained():
    text = (REPO / "docs" / "reliability.md").read_text()
    patterns = [
        r"\bcode\s*=\s*\"([a-z_]+)\"",  # code="x" and code = "x"
        r"code, message = \"([a-z_]+)\"",
        r"\{\"error\": \"([a-z_]+)\"\}",  # per-frame problems found on the worker
        r"ListingProblem\(\s*[^,]+,\s*\"([a-z_]+)\"",
        r"_fail\(\s*[^,]+,\s*\"([a-z_]+)\"",
    ]
    codes = set()
    for path in (REPO / "src" / "voxlake" / "ingest").rglob("*.py"):
        source = path.read_text()
        for pattern in patterns:
            codes |= set(re.findall(pattern, source))
    # Errors that stop a command (the run, or verify), not failure rows.
    codes -= {"source_not_found", "source_unreachable", "no_references"}
    assert len(codes) > 20
    assert not {c for c in codes if f"`{c}`" not in text}
    readme = (REPO / "README.md").read_text()
    section = readme.split("## What is stored", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([a-z]+_[a-z_]+)`", section)) & codes
    assert not {c for c in listed if f"`{c}`" not in text}


# --------------------------------------------------------------------------- commands
COMMANDS = shown_commands()


def test_docs_show_commands():
    pages = {name for name, _ in COMMANDS}
    assert {"README.md", "quickstart.md", "operations.md", "viewing.md"} <= pages
    assert any(name.endswith(".ipynb") for name in pages)


@pytest.mark.parametrize(("page", "line"), COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_every_shown_command_parses(page, line):
    parse(line)


def test_the_checker_rejects_what_does_not_parse():
    import typer

    parse("voxlake ingest a b --catalog c --store s --workers 3")
    for bad in (
        "voxlake ingest a --catalog c --store s --no-such-option",
        "voxlake ingest --catalog c --store s",  # a source is required
        "voxlake catalog show",  # URL missing
        "voxlake show cat --t notanumber",
    ):
        with pytest.raises((typer.TyperException, Exception)):  # click's usage errors
            parse(bad)
    with pytest.raises(AssertionError):
        parse("voxlake catalog no-such-command x")
    with pytest.raises(AssertionError):
        parse("voxlake catalog")


@pytest.mark.parametrize("path", [" ".join(p) for p, _ in leaf_commands()])
def test_every_command_has_help_with_an_example(path):
    from typer.testing import CliRunner

    from voxlake.cli import app

    result = CliRunner().invoke(app, [*path.split(), "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    command = dict((" ".join(p), c) for p, c in leaf_commands())[path]
    examples = re.findall(r"`(voxlake [^`]+)`", command.help or "")
    assert examples, f"`voxlake {path} --help` shows no example"
    for example in examples:
        assert example.startswith(f"voxlake {path}")
        parse(example)


def test_readme_lists_every_command():
    """The README's command table has a row for every command that runs."""
    table = (REPO / "README.md").read_text().split("## Commands", 1)[1].split("\n## ", 1)[0]
    listed = set()
    for row in re.findall(r"^\| `voxlake ([^`]+)`", table, re.M):
        first, *rest = row.split()
        listed.add(first)  # a command, or a group followed by its command (or commands)
        listed.update(f"{first} {name}" for name in rest[0].split("\\|") if rest)
    missing = [" ".join(path) for path, _ in leaf_commands() if " ".join(path) not in listed]
    assert not missing, f"README's command table lacks {missing}"


def run_voxlake(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("VOXLAKE_SECRET", None)
    return subprocess.run(
        ["voxlake", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_errors_are_one_line_and_a_hint(tmp_path):
    result = run_voxlake("catalog", "show", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("error [catalog_not_found] ")
    assert lines[1].startswith("hint: ")

    result = run_voxlake("ingest", str(tmp_path), "--catalog", "c", "--store", "s", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error [secret_missing] ") and "VOXLAKE_SECRET" in result.stderr

    result = run_voxlake("catalog", "show", cwd=tmp_path)  # a usage error
    assert result.returncode == 2
    assert "Missing argument" in result.stderr and "--help" in result.stderr
    assert "Traceback" not in result.stderr

    result = run_voxlake("--debug", "catalog", "show", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr


# --------------------------------------------------------------------------- links
def test_links_resolve():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken


def test_readme_links_every_page_and_notebook():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Documentation", 1)[1].split("\n## ", 1)[0]
    for page in [*DOCS, *NOTEBOOKS]:
        assert f"]({page.relative_to(REPO).as_posix()})" in section, page.name


def test_changelog_has_an_unreleased_section():
    text = (REPO / "CHANGELOG.md").read_text()
    assert re.search(r"^## \[?Unreleased\]?", text, flags=re.M)
