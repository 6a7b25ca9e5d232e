"""Results files of trainers: what each rank restored and what its Snapshotter did, as JSON lines.

A trainer given `--results PATH` ("{rank}" in PATH is replaced by the rank) appends one record
after its restore and one when it finishes:

    {"event": "restore", "rank": 1, "pid": 4242, "time": 1.7e9, "restored_step": 33,
     "restore_source": "local", "restore_s": 0.11, "restore_unusable": {"34": "checksum mismatch ..."},
     "restore_held": [34, 33], "restore_gathered": false, ...}
    {"event": "done", "rank": 1, "pid": 4242, "time": 1.7e9, "sealed": 70, "skipped": 0, ...}

The fields after "time" are `SnapshotStats.to_json()` (ftd.client.snapshotter). The demo, the
chaos run, the benchmarks and the tests read these files instead of the trainers' logs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Record = dict[str, Any]


def write(path: str, event: str, rank: int, stats: Any = None, **fields: Any) -> None:
    """Append one record (`stats`: a SnapshotStats or None) to `path` ({rank} replaced); nothing when path is ''."""
    if not path:
        return
    doc: Record = {"event": event, "rank": rank, "pid": os.getpid(), "time": time.time()}
    if stats is not None:
        doc.update(stats.to_json())
    doc.update(fields)
    with open(path.replace("{rank}", str(rank)), "a") as f:
        f.write(json.dumps(doc) + "\n")


def read(paths: Iterable[Path]) -> list[Record]:
    """Every record of these files, in file order (lines cut short by a SIGKILL are left out)."""
    records = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def restores(records: Iterable[Record], since: float = 0.0) -> list[Record]:
    """The restore records written at or after `since` (time.time()), oldest first."""
    return sorted((r for r in records if r["event"] == "restore" and r["time"] >= since), key=lambda r: r["time"])


def resumed(records: Iterable[Record]) -> list[Record]:
    """Restores that resumed a step (not a fresh start)."""
    return [r for r in restores(records) if r["restored_step"]]


def restarted_from_0(records: Iterable[Record]) -> list[Record]:
    """Restores that started from step 0 although the rank's daemon held steps (none could be used)."""
    return [r for r in restores(records) if not r["restored_step"] and r["restore_held"]]


def latest(records: Iterable[Record], event: str) -> dict[int, Record]:
    """rank -> that rank's newest record of `event`."""
    found: dict[int, Record] = {}
    for record in sorted(records, key=lambda r: r["time"]):
        if record["event"] == event:
            found[record["rank"]] = record
    return found
