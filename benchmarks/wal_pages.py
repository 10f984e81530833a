"""Where the sequencer's writes go on SQLite: the WAL frames of a drain, by the table or
index each page belongs to, with shipment state on and off.

    .venv/bin/python benchmarks/wal_pages.py                  # about a minute
    .venv/bin/python benchmarks/wal_pages.py --feeds unique --batches 1000

SQLite writes a whole page (4 KB) to the WAL for every page a transaction changed, however
little of it changed, and a checkpoint later writes each of them again into the database
file: what a settle costs the writer thread follows the number of pages it dirties more
than the bytes of its rows. This drains a copy of state_cost.py's feeds (the same inbox,
the same config, the real Sequencer) with the connection's automatic checkpoints off, so
that every frame stays in the WAL, and a second connection held open, so that closing the
store does not checkpoint it away. Then each frame's page number is looked up in SQLite's
`dbstat` table. Prints frames per batch per b-tree, on and off, and frames per commit.

The drains' CPU is not comparable with state_cost.py's (no checkpoint runs): this counts
pages, state_cost.py times.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sqlite3
import struct
import sys
from pathlib import Path
from typing import Any

import state_cost
from common import PYTHON, Row, children_in, print_table, run_json, run_main, work_dir

WAL_HEADER = 32
FRAME_HEADER = 24


def frames_of(db: str) -> tuple[list[int], int]:
    """The page number of every frame in `db`'s WAL, and how many frames end a commit."""
    data = Path(db + "-wal").read_bytes()
    page_size = struct.unpack(">I", data[8:12])[0]
    pages, commits, at = [], 0, WAL_HEADER
    while at + FRAME_HEADER + page_size <= len(data):
        page, size_after_commit = struct.unpack(">II", data[at:at + 8])
        pages.append(page)
        commits += size_after_commit != 0  # set on a commit's last frame only
        at += FRAME_HEADER + page_size
    return pages, commits


def owners(db: str) -> dict[int, str]:
    with sqlite3.connect(db) as conn:
        return {page: name for name, page in conn.execute("SELECT name, pageno FROM dbstat")}


async def drain(db: str, state: bool, workdir: Path) -> dict[str, Any]:
    """state_cost.drain with automatic checkpoints off; the frames mapped afterwards."""
    from bridge.outbox.sqlite import SqliteStore

    opened = SqliteStore.open

    async def open_without_checkpoints(self: SqliteStore, *, recover: bool = False) -> None:
        await opened(self, recover=recover)
        await self._call(lambda c: c.execute("PRAGMA wal_autocheckpoint=0"))

    SqliteStore.open = open_without_checkpoints  # type: ignore[method-assign]
    holder = sqlite3.connect(db)  # open until the frames are read: no checkpoint at close
    holder.execute("SELECT 1 FROM inbox LIMIT 1").fetchall()
    result = await state_cost.drain(db, state, "WARNING", workdir)
    pages, commits = frames_of(db)
    holder.close()
    names = owners(db)
    by_tree = collections.Counter(names.get(p, "(free list)") for p in pages)
    return {"batches": result["batches"], "frames": len(pages), "commits": commits,
            "by_tree": dict(by_tree), "deliveries": result["deliveries"],
            "verdicts": result["verdicts"]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--batches", type=int, default=3000, help="batches per feed")
    p.add_argument("--items", type=int, default=10)
    p.add_argument("--feeds", nargs="+", choices=state_cost.FEEDS,
                   default=list(state_cost.FEEDS))
    p.add_argument("--gap", type=float, default=8000.0)
    p.add_argument("--repeat", type=float, default=0.1)
    p.add_argument("--stale", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--data-dir", help="where the SQLite files live (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--drain", help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--state", choices=("on", "off"), help=argparse.SUPPRESS)
    return p.parse_args()


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    with children_in(workdir) as kids:
        def child(name: str, db: str, state: str) -> dict[str, Any]:
            result, _ = run_json(kids, name, [PYTHON, __file__, "--drain", db, "--state",
                                              state, "--workdir", str(workdir)], timeout=3600)
            return result

        for feed in args.feeds:
            past, bodies = (state_cost.history_bodies if feed == "histories"
                            else state_cost.unique_bodies)(args)
            master = state_cost.create_target(workdir, None, feed, None)
            if past:  # as state_cost.py: the past's states in storage
                asyncio.run(state_cost.prefill(master, past, args.items))
                run_json(kids, f"{feed}-past", [PYTHON, state_cost.__file__, "--drain",
                                                master, "--state", "on", "--log-level",
                                                "WARNING", "--workdir", str(workdir)],
                         timeout=3600)
            asyncio.run(state_cost.prefill(master, bodies, args.items))
            out[feed] = {}
            for state in ("on", "off"):
                db = state_cost.create_target(workdir, None, f"{feed}_{state}", master)
                out[feed][state] = child(f"{feed}-{state}", db, state)
                state_cost.remove_target(db)
            state_cost.remove_target(master)
    return out


def report(result: dict[str, dict[str, Any]]) -> None:
    rows = []
    for feed, runs in result.items():
        on, off = runs["on"], runs["off"]
        trees = sorted(set(on["by_tree"]) | set(off["by_tree"]),
                       key=lambda t: -(on["by_tree"].get(t, 0) + off["by_tree"].get(t, 0)))
        for tree in trees:
            a, b = on["by_tree"].get(tree, 0), off["by_tree"].get(tree, 0)
            rows.append(Row(f"{feed}: {tree}, WAL frames per batch, on / off",
                            f"{a / on['batches']:.2f} / {b / off['batches']:.2f}"))
        rows.append(Row(f"{feed}: all frames per batch (per commit), on / off",
                        f"{on['frames'] / on['batches']:.1f} ({on['frames'] // on['commits']})"
                        f" / {off['frames'] / off['batches']:.1f}"
                        f" ({off['frames'] // off['commits']})"))
        rows.append(Row(f"{feed}: deliveries per batch, on / off",
                        f"{on['deliveries'] / on['batches']:.1f} / "
                        f"{off['deliveries'] / off['batches']:.1f}"))
    print_table(rows)


def main() -> int:
    args = parse_args()
    if args.drain:
        json.dump(asyncio.run(drain(args.drain, args.state == "on", args.workdir)),
                  sys.stdout)
        print()
        return 0
    with work_dir(args.keep, args.data_dir) as workdir:
        report(measure(args, workdir))
    return 0


if __name__ == "__main__":
    run_main(main)
