"""YAML with line numbers and ${VAR} substitution, so config errors can point at a line."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from bridge.errors import ConfigError
from bridge.redact import REDACTOR, names_a_credential

KeyPath = tuple[str | int, ...]

# An unquoted JSONPath with a bracket, as written in a flow mapping: `{path: $.steps[*].x`.
# It runs to the next `, key:` or the closing brace.
_UNQUOTED_PATH = re.compile(r"""(?<!["'])(\$[.\[][^\s,}\[]*\[.*?)\s*(?=,\s*[\w-]+:|}|$)""")

# ${VAR} or ${VAR:-default}; $${ is a literal "${".
_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# What is left of a `${` that is none of those: `${UNCLOSED`, `${ VAR }`, `${VAR:=x}`. Taken
# as written it would become the value itself (a secret of "${ISENDU_SECRET"), and a masked
# secret does not show it. `${{`, `${%` and `${#` are a dollar sign before a template's
# expression, statement or comment ("${{ item.total.amount }}"), not a reference.
_NOT_A_VAR = re.compile(r"\$\{(?![{%#])")
# `$ISENDU_SECRET`: a shell's way to name a variable, which this file does not read. Only
# warned of (a secret may hold a `$`), and only in a credential's value, where it would
# be sent as the secret itself.
_BARE_VAR = re.compile(r"(?<![\w$])\$([A-Z][A-Z0-9_]{2,})\b")


def variables_in(text: str) -> list[str]:
    """The names of the `${VAR}` / `${VAR:-default}` a value is written with, in order."""
    return [m.group(1) for m in _VAR.finditer(text) if m.group(1)]


def variable_spans(text: str) -> list[tuple[str, int, int]]:
    """Each `${VAR}` / `${VAR:-default}` of a value: its name, and where it starts and
    ends in `text`, to tell what part of the value it gives."""
    return [(m.group(1), m.start(), m.end()) for m in _VAR.finditer(text) if m.group(1)]


def format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


@dataclass
class Source:
    """Parsed YAML plus where each key path came from."""

    file: str
    data: Any
    lines: dict[KeyPath, int] = field(default_factory=dict)
    raw: dict[KeyPath, str] = field(default_factory=dict)  # strings as written, before ${VAR}
    # Found while reading (an unset variable, a duplicate key): reported together with what
    # validation finds, so one `check` lists every error. Validation's own complaints about
    # an empty value where a variable was unset (`unset`) are left out.
    problems: list[str] = field(default_factory=list)
    unset: list[KeyPath] = field(default_factory=list)  # where a variable was unset ("" left)
    # Valid, but probably not meant (`check` prints them, `serve` logs them at start).
    warnings: list[str] = field(default_factory=list)

    def line_of(self, path: KeyPath) -> int | None:
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None

    def where(self, path: KeyPath) -> str:
        line = self.line_of(path)
        loc = f"{self.file}:{line}" if line is not None else self.file
        return f"{loc}: {format_path(path)}"


class _Builder:
    def __init__(self, file: str, env: Mapping[str, str]) -> None:
        self.file = file
        self.env = env
        self.lines: dict[KeyPath, int] = {}
        self.raw: dict[KeyPath, str] = {}
        self.problems: list[str] = []
        self.unset: list[KeyPath] = []
        self.warnings: list[str] = []
        self._scalars = yaml.SafeLoader("")  # only its scalar constructors are used

    def build(self, node: yaml.Node, path: KeyPath) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            self._scalars.flatten_mapping(node)  # YAML merge keys (<<: *anchor)
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self.build(key_node, (*path, "<key>"))
                if not isinstance(key, str | int | float | bool) or key is None:
                    self._problem(key_node, path, "a mapping key must be a plain value")
                    continue
                key = str(key) if not isinstance(key, str) else key
                if key in out:
                    self._problem(key_node, (*path, key), f"duplicate key {key!r}")
                child = (*path, key)
                self.lines[child] = key_node.start_mark.line + 1
                out[key] = self.build(value_node, child)
            self.lines.pop((*path, "<key>"), None)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(child, (*path, i)) for i, child in enumerate(node.value)]
        value = self._scalars.construct_object(node)
        if isinstance(value, str) and "$" in value:
            return self._substitute(value, path, node)
        return value

    def _substitute(self, text: str, path: KeyPath, node: yaml.Node) -> str:
        def repl(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return "${"
            name, default = m.group(1), m.group(2)
            value = self.env.get(name, default)
            if value is None:
                self.unset.append(path)
                self._problem(
                    node, path,
                    f"environment variable {name} is not set; set it, or write "
                    f"${{{name}:-default}} to give a default",
                )
                return ""
            if names_a_credential(name):
                # `${SHOP_API_TOKEN}` holds a secret wherever it is used: scrubbed from every
                # log line and stored reason from now on.
                REDACTOR.add_guessed(value)
            return value

        bare = _BARE_VAR.search(_VAR.sub("", text))
        if bare and path and isinstance(path[-1], str) and names_a_credential(path[-1]):
            # The name is not quoted: it is part of a secret's value as written.
            self.warnings.append(
                f"{self.file}:{node.start_mark.line + 1}: {format_path(path)}: a `$NAME` in "
                f"this value is taken as written, not read from the environment; write "
                f"${{NAME}} to read a variable")
        if _NOT_A_VAR.search(_VAR.sub("", text)):
            self._problem(node, path, "this value has a `${` that starts no variable; "
                          "expected ${NAME} or ${NAME:-default} (NAME: letters, digits and _), "
                          "or $${ for a literal ${")
        result = _VAR.sub(repl, text)
        if result != text:
            self.raw[path] = text
        return result

    def _problem(self, node: yaml.Node, path: KeyPath, message: str) -> None:
        line = node.start_mark.line + 1
        self.problems.append(f"{self.file}:{line}: {format_path(path)}: {message}")


def load_yaml(text: str, file: str, env: Mapping[str, str] | None = None) -> Source:
    """Parse `text`; raise ConfigError naming the file and line of any YAML problem."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        hint = ""
        source_line = text.splitlines()[mark.line] if mark and mark.line < len(
            text.splitlines()) else ""
        problem = exc.problem or exc.context or ""
        if "${" in source_line:
            hint = ' (inside {...} or [...], quote values that use variables: "${VAR}")'
        elif (problem.startswith(("expected ','", "expected alphabetic or numeric"))
              and _UNQUOTED_PATH.search(source_line)):
            # `{path: $.steps[*].error}`: in a flow mapping `[` opens a list (and `*` an
            # alias, in a nested one).
            found = _UNQUOTED_PATH.search(source_line)
            shown = found.group(1) if found else "$.steps[*].error"
            quoted = f"'{shown}'" if '"' in shown else f'"{shown}"'
            hint = f" (inside {{...}} or [...], quote a JSONPath with brackets: path: {quoted})"
        elif problem.startswith("expected <block end>"):
            # PyYAML's words for a key indented less than its neighbours.
            hint = (" (check this line's indentation: a key must start in the same column "
                    "as the other keys of its block, e.g. `to:` under `name:` in a route)")
        elif problem.startswith("mapping values are not allowed"):
            # A `: ` inside a plain value (`message: Shipped: {{ ... }}`), or a key
            # indented more than its neighbours.
            hint = (' (quote a value that contains ": ", e.g. message: "Shipped: {{ '
                    "item.uuid }}\"; or check this line's indentation against the keys above)")
        raise ConfigError(
            [f"{file}{line}: not valid YAML: {problem}{hint}"]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{file}: not valid YAML: {exc}"]) from None
    if node is None:
        return Source(file=file, data={})
    builder = _Builder(file, os.environ if env is None else env)
    data = builder.build(node, ())
    return Source(file=file, data=data, lines=builder.lines, raw=builder.raw,
                  problems=builder.problems, unset=builder.unset, warnings=builder.warnings)
