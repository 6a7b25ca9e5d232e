"""Named byte regions behind a bulk server's Reader and Writer, for the transport tests."""

from __future__ import annotations

import threading
import time
from typing import Any

from ftd.errors import NotFound


class Memory:
    """A dict of named byte regions behind the Reader/Writer callbacks, counting calls and overlap."""

    def __init__(self, regions: dict[str, bytearray]):
        self.regions = regions
        self.reads = self.writes = 0
        self.inside = self.most_inside = 0
        self._lock = threading.Lock()

    def _region(self, key: dict[str, Any], offset: int, length: int) -> bytearray:
        if set(key) != {"name"}:
            raise ValueError(f"bad key {key}")
        if key["name"] == "missing":
            raise NotFound(f"no snapshot {key['name']}")
        region = self.regions[key["name"]]  # KeyError for unknown names
        if offset + length > len(region):
            raise ValueError(f"range {offset}+{length} beyond {len(region)} bytes")
        return region

    def _enter(self) -> None:
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)

    def _leave(self) -> None:
        with self._lock:
            self.inside -= 1

    def read(self, key: dict[str, Any], offset: int, length: int) -> memoryview:
        self._enter()
        try:
            self.reads += 1
            if key.get("name") == "slow":
                time.sleep(0.6)
                return memoryview(b"S" * length)
            return memoryview(self._region(key, offset, length))[offset:offset + length]
        finally:
            self._leave()

    def write(self, key: dict[str, Any], offset: int, data: memoryview) -> None:
        self._enter()
        try:
            self.writes += 1
            self._region(key, offset, len(data))[offset:offset + len(data)] = data
        finally:
            self._leave()
