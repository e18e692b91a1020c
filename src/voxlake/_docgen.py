"""Generate the reference pages ``docs/cli.md`` and ``docs/configuration.md`` from the code.

``voxlake docs cli`` and ``voxlake docs config`` write them; ``tests/test_docs.py`` fails
when a checked-in page differs from what these functions render, so the references
cannot drift from the typer app and the configuration dataclasses.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from typing import Any

__all__ = [
    "ENVIRONMENT_VARIABLES",
    "attribute_docs",
    "render_cli_markdown",
    "render_config_markdown",
]

_EXAMPLE = re.compile(r"`(voxlake [^`]+)`")
_EXAMPLE_SENTENCE = re.compile(r"Examples?:\s*((?:`voxlake [^`]+`[\s,;.]*)+)")


# --------------------------------------------------------------------------- CLI
def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _default(value: Any) -> str:
    if value is None or value == ():
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return str(value)


def _metavar(param: Any, ctx: Any) -> str:
    shown = str(param.display_type(ctx)).strip("<>")
    kinds = [k.strip() for k in shown.split(",")]
    names = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "bool": ""}
    return " ".join(names.get(k, k.upper()) for k in kinds if names.get(k, k))


def _argument_name(param: Any) -> str:
    name = str(param.name).upper()
    return f"{name}..." if param.nargs == -1 else name


def _usage(path: str, command: Any) -> str:
    parts = [path]
    if any(p.param_type_name == "option" for p in command.params):
        parts.append("[OPTIONS]")
    for param in command.params:
        if param.param_type_name == "argument":
            name = _argument_name(param)
            parts.append(name if param.required else f"[{name}]")
    if hasattr(command, "commands"):
        parts.append("COMMAND [ARGS]...")
    return " ".join(parts)


def _help_parts(text: str) -> tuple[str, list[str]]:
    """Split a command docstring into its prose and its ``voxlake ...`` examples."""
    examples = _EXAMPLE.findall(text)
    prose = _EXAMPLE_SENTENCE.sub("", text)
    paragraphs = [" ".join(p.split()) for p in prose.split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p), examples


def _command_section(path: str, command: Any, ctx: Any, level: int) -> list[str]:
    prose, examples = _help_parts(command.help or "")
    lines = [f"{'#' * level} `{path}`", "", prose, ""]
    lines += ["```text", f"Usage: {_usage(path, command)}", "```", ""]
    if examples:
        lines += ["Example" + ("s" if len(examples) > 1 else "") + ":", "", "```bash"]
        lines += [*examples, "```", ""]
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    options = [p for p in command.params if p.param_type_name == "option" and not p.hidden]
    if arguments:
        lines += ["| argument | description |", "|---|---|"]
        for param in arguments:
            required = " (required)" if param.required else ""
            lines.append(f"| `{_argument_name(param)}` | {_cell(param.help or '')}{required} |")
        lines.append("")
    if options:
        lines += ["| option | default | description |", "|---|---|---|"]
        for param in options:
            flag = " / ".join([*param.opts, *param.secondary_opts])
            metavar = "" if param.is_flag else _metavar(param, ctx)
            name = f"`{flag} {metavar}`" if metavar else f"`{flag}`"
            required = " (required)" if param.required else ""
            default = "" if param.required else _cell(_default(param.default))
            lines.append(f"| {name} | {default} | {_cell(param.help or '')}{required} |")
        lines.append("")
    return lines


def _walk(command: Any, path: str, ctx: Any) -> list[tuple[str, Any, Any]]:
    found: list[tuple[str, Any, Any]] = []
    for name in command.list_commands(ctx):
        child = command.commands[name]
        child_ctx = type(ctx)(child, info_name=name, parent=ctx)
        found.append((f"{path} {name}", child, child_ctx))
        if hasattr(child, "commands"):
            found += _walk(child, f"{path} {name}", child_ctx)
    return found


def render_cli_markdown() -> str:
    """Render the command-line reference (``docs/cli.md``) from the typer app."""
    import typer.main

    from voxlake.cli import app

    root: Any = typer.main.get_command(app)
    ctx = root.context_class(root, info_name="voxlake")
    commands = _walk(root, "voxlake", ctx)
    lines = [
        "# Command-line reference",
        "",
        "Generated from the typer app in `src/voxlake/cli/` by"
        " `voxlake docs cli --out docs/cli.md`; do not edit by hand.",
        "",
        "Every command prints this help with `--help`. Errors print one line with a code"
        " and a hint; put `--debug` before the command (`voxlake --debug ingest ...`) to"
        " see the traceback instead.",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for path, command, _ in commands:
        summary = _cell((command.help or "").strip().split("\n\n")[0])
        anchor = re.sub(r"[^a-z0-9 -]", "", path.lower()).replace(" ", "-")
        lines.append(f"| [`{path}`](#{anchor}) | {summary} |")
    lines.append("")
    prose, _ = _help_parts(root.help or "")
    lines += ["## `voxlake`", "", prose, ""]
    lines += ["```text", f"Usage: {_usage('voxlake', root)}", "```", ""]
    lines += ["| global option | description |", "|---|---|"]
    for param in root.params:
        if param.param_type_name == "option" and not param.hidden:
            lines.append(f"| `{' / '.join(param.opts)}` | {_cell(param.help or '')} |")
    lines.append("")
    for path, command, child_ctx in commands:
        level = 2 if path.count(" ") == 1 else 3
        lines += _command_section(path, command, child_ctx, level)
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- configuration
#: ``VOXLAKE_*`` variables that are not configuration keys: name -> description.
ENVIRONMENT_VARIABLES: dict[str, str] = {
    "VOXLAKE_STORAGE_OPTIONS": (
        "Set by `voxlake train --nproc N` for its torchrun ranks: the catalog and store"
        " storage options as JSON, passed in the environment because they may hold"
        " credentials that must not appear in a process list. Not meant to be set by hand."
    ),
    "VOXLAKE_REQUIRE_SHARED_DATA": (
        "Test suite only: `1` makes tests that need `../shared/data/real` fail instead of"
        " skip when it is absent (CI sets it)."
    ),
    "VOXLAKE_REQUIRE_PACS": (
        "Test suite only: `1` makes the PACS tests (DICOMweb, DIMSE) fail instead of skip when"
        " Orthanc and its DICOMweb plugin are not installed (CI sets it)."
    ),
    "VOXLAKE_REQUIRE_TORCH": (
        "Test suite only: `1` makes a run without torch (the `train` extra) an error instead"
        " of leaving out the training tests (CI sets it for `make test`, not for"
        " `make test-latest`)."
    ),
}


def attribute_docs(cls: type[Any]) -> dict[str, str]:
    """Parse the numpydoc ``Attributes`` section of ``cls``: name -> one-line description.

    Entries naming several attributes (``a, b``) are given to each. Raises ``ValueError``
    when a dataclass field has no description, so an undocumented key fails the docs test.
    """
    doc = inspect.getdoc(cls) or ""
    match = re.search(r"^Attributes\n-+\n(.*?)(?=^\S[^\n]*\n-+\n|\Z)", doc, flags=re.S | re.M)
    found: dict[str, str] = {}
    if match:
        names: list[str] = []
        for line in match.group(1).splitlines():
            if line and not line[0].isspace():
                names = [n.strip() for n in line.split(",")]
                for name in names:
                    found[name] = ""
            elif line.strip():
                for name in names:
                    found[name] = f"{found[name]} {line.strip()}".strip()
    if dataclasses.is_dataclass(cls):
        missing = [f.name for f in dataclasses.fields(cls) if not found.get(f.name)]
        if missing:
            raise ValueError(f"{cls.__name__} lacks descriptions of: {', '.join(missing)}")
    return {name: _markdown(text) for name, text in found.items()}


def _markdown(text: str) -> str:
    """RST inline markup of docstrings -> Markdown (``x`` and :func:`x` become `x`)."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def _field_default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _toml_value(value: Any) -> str:
    """`value` as a TOML value (dicts as inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, int):
        return f"{value:_}" if abs(value) >= 10_000 else str(value)
    return repr(value)


def _example_toml() -> list[str]:
    from voxlake.config import _SECTIONS, IngestConfig

    lines = ["[ingest]"]
    for field in dataclasses.fields(IngestConfig):
        if field.name in _SECTIONS:
            continue
        lines.append(_toml_line(field))
    for name, cls in _SECTIONS.items():
        lines += ["", f"[ingest.{name}]"]
        lines += [_toml_line(field) for field in dataclasses.fields(cls)]
    return lines


def _toml_line(field: dataclasses.Field[Any]) -> str:
    value = _field_default(field)
    if value is None:
        return f"# {field.name} = ...   (not set by default)"
    return f"{field.name} = {_toml_value(value)}"


def _config_table(
    cls: type[Any], *, flags: dict[str, str], env: dict[str, str], skip: tuple[str, ...] = ()
) -> list[str]:
    docs = attribute_docs(cls)
    lines = ["| key | type | default | flag / variable | description |", "|---|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        default = _field_default(field)
        shown = "" if default is dataclasses.MISSING or default is None else _toml_value(default)
        where = ", ".join(
            f"`{w}`" for w in (flags.get(field.name), env.get(field.name)) if w is not None
        )
        lines.append(
            f"| `{field.name}` | `{_cell(str(field.type))}` | {_cell(shown)} | {where} |"
            f" {_cell(docs[field.name])} |"
        )
    return lines


def _summary(cls: type[Any]) -> str:
    return _cell(_markdown((inspect.getdoc(cls) or "").split("\n\n")[0]))


def _flags_of(command_name: str) -> dict[str, str]:
    import typer.main

    from voxlake.cli import app

    root = typer.main.get_command(app)
    command = root.commands.get(command_name)  # type: ignore[attr-defined]
    if command is None:
        return {}
    return {
        str(p.name): p.opts[0]
        for p in command.params
        if p.param_type_name == "option" and p.opts[0].startswith("--")
    }


def render_config_markdown() -> str:
    """Render the configuration reference (``docs/configuration.md``)."""
    from voxlake.config import _ENV_INGEST, _SECTIONS, IngestConfig
    from voxlake.training.train import TrainConfig

    env = {key: var for var, (key, _) in _ENV_INGEST.items()}
    ingest_flags = _flags_of("ingest")
    ingest_flags.pop("config_file", None)
    train_flags = {
        {"out_dir": "out", "version": "catalog_version"}.get(k, k): v
        for k, v in _flags_of("train").items()
    }
    lines = [
        "# Configuration reference",
        "",
        "Generated from the docstrings of the dataclasses in `voxlake.config` and of"
        " `voxlake.training.TrainConfig` by `voxlake docs config --out docs/configuration.md`;"
        " do not edit by hand.",
        "",
        "## Where settings come from",
        "",
        "`voxlake ingest` builds one `IngestConfig` from three places, later ones winning:",
        "",
        "1. a TOML file given with `--config FILE.toml` (its `[ingest]` table and the"
        f" {', '.join(f'`[ingest.{name}]`' for name in _SECTIONS)} sub-tables);",
        "2. `VOXLAKE_*` environment variables (table below);",
        "3. command-line flags.",
        "",
        "Unknown keys are refused with a one-line error, so a typo never passes silently."
        " In Python, build the dataclasses directly and pass them to the functions:"
        " library code never reads files or the environment, except that a missing"
        " `secret` falls back to `VOXLAKE_SECRET`.",
        "",
        "```python",
        "from voxlake.config import DeidConfig, IngestConfig, load_config",
        "",
        'config = IngestConfig(secret="...", workers=8, deid=DeidConfig(date_mode="year"))',
        'config = load_config("voxlake.toml")   # what the CLI does: file, then VOXLAKE_*',
        "```",
        "",
        "A file with every key at its default:",
        "",
        "```toml",
        *_example_toml(),
        "```",
        "",
        "Keep the secret out of this file if the file is shared or versioned: set"
        " `VOXLAKE_SECRET` instead (see [operations](operations.md#the-de-identification-secret)).",
        "",
        "## `[ingest]`: `IngestConfig`",
        "",
        _summary(IngestConfig),
        "",
        *_config_table(IngestConfig, flags=ingest_flags, env=env, skip=tuple(_SECTIONS)),
        "",
        *[
            line
            for name, cls in _SECTIONS.items()
            for line in (
                f"## `[ingest.{name}]`: `{cls.__name__}`",
                "",
                _summary(cls),
                "",
                *_config_table(cls, flags={}, env={}),
                "",
            )
        ],
        "## Environment variables",
        "",
        "| variable | sets | type |",
        "|---|---|---|",
    ]
    for var, (key, kind) in _ENV_INGEST.items():
        lines.append(f"| `{var}` | `[ingest] {key}` | {kind.__name__} |")
    lines += ["", "Other variables voxlake reads:", "", "| variable | meaning |", "|---|---|"]
    for var, text in ENVIRONMENT_VARIABLES.items():
        lines.append(f"| `{var}` | {_cell(text)} |")
    lines += [
        "",
        "Credentials for object storage are not voxlake settings: they come from the usual"
        " AWS variables and files, or from `storage_options`"
        " (see [operations](operations.md#object-storage-s3-and-compatible)).",
        "",
        "## Training: `TrainConfig`",
        "",
        "Options of `voxlake train` and of `voxlake.training.run_training(TrainConfig(...))`."
        " Not read from TOML or the environment.",
        "",
        *_config_table(TrainConfig, flags=train_flags, env={}),
        "",
        "## Streaming",
        "",
        "`VolumeStream` takes its options as keyword arguments (`shape`, `seed`, `shuffle`,"
        " `prefetch`, `normalize`, `output`, `label_column`, ...; see its docstring);"
        " `voxlake train` sets them from `TrainConfig` above.",
        "",
    ]
    return "\n".join(lines).rstrip() + "\n"
