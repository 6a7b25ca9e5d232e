"""Internal tunables: sizes, timeouts and poll intervals that are not user settings.

User settings (`ftd.config.SETTINGS`) are what an operator chooses; knobs are what the code
needs a number for and a test may need to change (a shorter transfer timeout, a smaller
stripe). They live here, in one place, instead of as module constants. In a process, change
them with `override(...)` (a context manager); a child process reads a JSON object of
overrides from the environment variable `FTD_KNOBS` (for tests and benchmarks, not documented
as a setting): e.g. `FTD_KNOBS='{"pause_copy_at_step": 5}'`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ftd.errors import ConfigError

ENV = "FTD_KNOBS"


@dataclass(frozen=True)
class Knobs:
    """Every internal tunable, with its default."""

    stripe_bytes: int = 1 << 20
    """Largest erasure-coding stripe; a chunk is a whole number of stripes."""
    encode_batch_bytes: int = 16 << 20
    """Bytes of each data chunk pulled and encoded at once."""
    rebuild_batch_bytes: int = 16 << 20
    """Bytes of each piece pulled and decoded at once during a rebuild."""
    transfer_timeout: float = 30.0
    """Longest stall of one bulk transfer; protection uses the peer timeout when it is shorter."""
    bulk_max_chunk: int = 8 << 20
    """Largest byte range of one bulk request."""
    served_pin_seconds: float = 60.0
    """How long a step a peer read stays pinned."""
    served_pins: int = 3
    """How many recently read steps stay pinned."""
    unprotected_kept: int = 4
    """Steps above the protected one whose parity and records are kept."""
    max_record_bytes: int = 16 << 20
    """Largest rotation record read from a peer or from disk (8 bytes of checksum per MiB and piece)."""
    max_manifest_bytes: int = 64 << 20
    """Largest segment manifest a peer may announce."""
    protect_interval: float = 0.2
    """Seconds between two passes of the protection loop."""
    peer_poll_interval: float = 0.1
    """Seconds between two looks at the peer inventories while waiting on peers."""
    durable_lookahead_s: float = 2.0
    """A time-cadence durable step is proposed this many seconds of steps ahead of the newest seal, so every
    daemon sees the proposal before it seals the step (more on a filesystem that caches directory listings)."""
    durable_proposal_retry_s: float = 60.0
    """How long a proposed durable step may stay uncommitted before another one is proposed."""
    pause_copy_at_step: int = -1
    """Test hook: a rank pauses the copy of this step half-way for `pause_copy_seconds`."""
    pause_copy_seconds: float = 600.0


_lock = threading.Lock()
_current: Knobs | None = None


def _from_environment() -> Knobs:
    raw = os.environ.get(ENV, "")
    if not raw:
        return Knobs()
    try:
        changes = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{ENV} is not a JSON object: {exc}") from None
    if not isinstance(changes, dict):
        raise ConfigError(f"{ENV} must be a JSON object of knob names and values")
    return _replace(Knobs(), changes, ENV)


def _replace(base: Knobs, changes: dict[str, Any], where: str) -> Knobs:
    fields = {f.name: f for f in dataclasses.fields(Knobs)}
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise ConfigError(f"unknown knob(s) in {where}: {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    typed = {}
    for name, value in changes.items():
        kind = type(getattr(base, name))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
            raise ConfigError(f"knob {name} in {where} must be a number, got {value!r}")
        typed[name] = kind(value)
    return dataclasses.replace(base, **typed)


def get() -> Knobs:
    """The knobs in force in this process."""
    global _current
    with _lock:
        if _current is None:
            _current = _from_environment()
        return _current


@contextlib.contextmanager
def override(**changes: Any) -> Iterator[Knobs]:
    """Change knobs for the duration of a `with` block (process-wide; for tests)."""
    global _current
    before = get()
    with _lock:
        _current = _replace(before, changes, "override()")
    try:
        yield _current
    finally:
        with _lock:
            _current = before
