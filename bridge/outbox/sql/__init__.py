"""SQL in named blocks, one file of queries per engine, and numbered migrations.

`queries.sql` holds blocks that start with `-- name: <name>`; `migrations/NNNN_<what>.sql`
are applied in order and recorded in the `schema_migrations` table (see migrate.py).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_MIGRATION = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@functools.cache
def queries(engine: str) -> dict[str, str]:
    """The named blocks of `<engine>/queries.sql`, comments and blank lines kept out."""
    text = resources.files(__package__).joinpath(engine, "queries.sql").read_text("utf-8")
    parts = _NAME.split(text)
    named: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in named:
            raise ValueError(f"{engine}/queries.sql: query {name!r} is defined twice")
        lines = [ln for ln in body.splitlines() if ln.strip() and not ln.lstrip().startswith("--")]
        named[name] = "\n".join(lines).strip().rstrip(";")
    return named


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


@functools.cache
def migrations(engine: str) -> tuple[Migration, ...]:
    """`<engine>/migrations/NNNN_<what>.sql`, in version order; versions must not repeat
    or leave gaps (a gap is a file lost in a merge)."""
    folder = resources.files(__package__).joinpath(engine, "migrations")
    steps = []
    for entry in folder.iterdir():
        match = _MIGRATION.match(entry.name)
        if match:
            steps.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    steps.sort(key=lambda m: m.version)
    for expected, step in enumerate(steps, start=1):
        if step.version != expected:
            raise ValueError(f"{engine} migrations: expected version {expected:04d}, "
                             f"found {step.version:04d}_{step.name}")
    return tuple(steps)
