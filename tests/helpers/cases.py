"""Case files under tests/data: a YAML file whose `# name: value` lines say what to expect."""

from __future__ import annotations

from pathlib import Path


def directives(path: Path, name: str) -> list[str]:
    """The values of every `# name: ...` line of a case file, in order."""
    head = f"# {name}: "
    return [line[len(head):].rstrip() for line in path.read_text().splitlines()
            if line.startswith(head)]
