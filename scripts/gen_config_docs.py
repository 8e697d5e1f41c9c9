"""Write docs/configuration.md, the reference of every setting, from tokenwire.config.

    python scripts/gen_config_docs.py          # write docs/configuration.md
    python scripts/gen_config_docs.py --check  # exit 1 if docs/configuration.md is stale

Every section of ``tokenwire.config.Config`` and every field of it is listed: its
name, type, default, environment variable and help text (the ``setting(default,
help)`` it was declared with), under the section class's docstring. The output
depends on nothing but the config classes, so the same code always writes the
same file and a check can tell when a new or changed setting was not written out.
"""

from __future__ import annotations

import argparse
import dataclasses
import decimal
import importlib.util
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "configuration.md"
COMMAND = "python scripts/gen_config_docs.py"

_TOML_KINDS: dict[type, str] = {
    str: "string",
    int: "integer",
    float: "float",
    bool: "boolean",
    decimal.Decimal: "decimal",
}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# Markdown that a help text must not trigger: emphasis, table cells, HTML, code spans.
_SPECIAL = re.compile(r"[\\*|<`]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
_RST_LITERAL = re.compile(r"``(.+?)``")


def _sections() -> Iterator[tuple[str, type[Any]]]:
    """``(name, section class)`` for every section of ``Config``, in declaration order."""
    if importlib.util.find_spec("tokenwire") is None:  # not installed: this checkout's
        sys.path.insert(0, str(ROOT / "framework"))
    from tokenwire.config import Config

    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        yield f.name, hints[f.name]


def _env_prefix() -> str:
    from tokenwire.config import ENV_PREFIX

    return ENV_PREFIX


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"setting {f.name!r} has no default")


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return kind, False


def type_name(kind: Any) -> str:
    """A field's type in TOML's words: ``string``, ``table of strings``, ..."""
    kind, optional = _unwrap_optional(kind)
    origin = typing.get_origin(kind)
    if kind in _TOML_KINDS:
        name = _TOML_KINDS[kind]
    elif origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        value = typing.get_args(kind)[1] if typing.get_args(kind) else Any
        if value in _TOML_KINDS:
            name = f"table of {_TOML_KINDS[value]}s"
        elif dataclasses.is_dataclass(value):
            name = f"table of {value.__name__} tables"
        else:
            name = "table"
    elif isinstance(kind, type):
        name = kind.__name__
    else:
        name = str(kind).replace("typing.", "")
    return f"{name} (optional)" if optional else name


def _key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def toml_value(value: Any) -> str:
    """``value`` as it would be written in the TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        items = ", ".join(f"{_key(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if value is None:
        return "(unset)"
    return repr(value)


def _escape(text: str) -> str:
    return _SPECIAL.sub(lambda m: "\\" + m.group(0), " ".join(text.split()))


def _code(text: str) -> str:
    """``text`` as a code span that survives a table cell."""
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    cell = text.replace("|", "\\|")
    return f"{fence}{pad}{cell}{pad}{fence}"


def docstring_markdown(doc: str | None) -> str:
    """A class docstring as Markdown: reST ````literals```` and ``::`` blocks converted."""
    if not doc:
        return ""
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(doc))
    out = []
    for paragraph in paragraphs:
        lines = paragraph.splitlines()
        if all(line.startswith("    ") for line in lines):  # a literal block
            out.append("```\n" + "\n".join(line[4:] for line in lines) + "\n```")
            continue
        text = _RST_LITERAL.sub(r"`\1`", paragraph)
        out.append(text[:-1] if text.endswith("::") else text)
    return "\n\n".join(out)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _nested(section: str, f: dataclasses.Field[Any], kind: Any) -> list[str]:
    """For a table of dataclass tables (e.g. quota plans): the keys each entry takes."""
    kind, _ = _unwrap_optional(kind)
    origin = typing.get_origin(kind)
    if not (isinstance(origin, type) and issubclass(origin, Mapping)):
        return []
    value_cls = typing.get_args(kind)[1]
    if not (dataclasses.is_dataclass(value_cls) and isinstance(value_cls, type)):
        return []
    hints = typing.get_type_hints(value_cls)
    rows = [
        [_code(g.name), type_name(hints[g.name]), _code(toml_value(_default(g))),
         _escape(g.metadata.get("help", ""))]
        for g in dataclasses.fields(value_cls)
    ]  # fmt: skip
    summary = docstring_markdown(value_cls.__doc__).split("\n\n")[0]
    return [
        "",
        f"Each entry of `{f.name}`, a `[{section}.{f.name}.NAME]` table, takes these keys "
        f"({value_cls.__name__}). {summary}",
        "",
        *_table(["Key", "Type", "Default", "Description"], rows),
    ]


def render() -> str:
    """The whole of docs/configuration.md."""
    sections = list(_sections())
    prefix = _env_prefix()
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by scripts/gen_config_docs.py from tokenwire.config. Do not edit: "
        f"change the settings' help texts and run {COMMAND}. -->",
        "",
        "Settings come from, lowest precedence first: each setting's default, a TOML file "
        "(`--config FILE`), environment variables "
        f"`{prefix}<SECTION>_<FIELD>`, then command-line flags (`--set SECTION.FIELD=VALUE`, "
        "repeatable, and shortcuts such as `--listen`). The configuration is read once at "
        "start-up and does not change afterwards. `tokenwire serve --help-config` prints "
        "the same list.",
        "",
        "```toml",
        "[server]",
        'listen = "0.0.0.0:50051"',
        "[backend]",
        'options = { weights = "int8" }',
        "```",
        "",
        "In the environment every value is a string: booleans are `true`/`false` "
        "(also `1`/`0`, `yes`/`no`, `on`/`off`), and a table is written "
        "`key=value,key=value` (e.g. "
        f"`{prefix}BACKEND_OPTIONS=weights=int8,kv_cache_mb=512`). "
        "Settings that take lists are comma-separated strings, so they read the same "
        "in the file and in the environment.",
        "",
        "Sections:",
        "",
    ]
    for name, cls in sections:
        summary = _escape(docstring_markdown(cls.__doc__).split("\n\n")[0].replace("`", ""))
        lines.append(f"- [`[{name}]`](#{name}): {summary}")
    for name, cls in sections:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        rows = [
            [_code(f.name), type_name(hints[f.name]), _code(toml_value(_default(f))),
             _code(f"{prefix}{name.upper()}_{f.name.upper()}"),
             _escape(f.metadata.get("help", ""))]
            for f in fields
        ]  # fmt: skip
        lines += ["", f"## `[{name}]`", ""]
        doc = docstring_markdown(cls.__doc__)
        if doc:
            lines += [doc, ""]
        lines += _table(["Setting", "Type", "Default", "Environment variable", "Description"], rows)
        for f in fields:
            lines += _nested(name, f, hints[f.name])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="the file to write or check")
    args = parser.parse_args(argv)
    fresh = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != fresh:
            print(f"stale {args.output}: run {COMMAND}", file=sys.stderr)
            return 1
        print(f"{args.output} is fresh")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
