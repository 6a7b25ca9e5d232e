"""The bulk data plane as an interface: byte ranges between node daemons (docs/ARCHITECTURE.md §5.5).

A node serves byte ranges of its memory through two callbacks, a `Reader` and a `Writer`, and
reads or writes ranges of a peer's memory through a `BulkClient`. A `BulkTransport` makes both
ends for one node. Two implementations keep the same contract (tests/unit/test_bulk_contract.py
runs one test suite against both):

* `ftd.daemon.transport.ZmqTransport`: CurveZMQ between processes, the production plane;
* `ftd.daemon.inproc.InProcessTransport`: nodes of one process, for unit tests of protection,
  rebuild and remote fetch, with a slow or unreachable peer on demand.

The contract:

* keys are flat dicts of at most `MAX_KEY_ITEMS` names to strings or 64-bit integers
  (`check_key`); a bad key is refused with `PeerRejected`, the reader never sees it;
* ranged calls move `length` bytes in pieces of at most the transport's `max_chunk`, so a reader
  is never asked for more than that at once;
* one node's reader and writer are called one request at a time (never concurrently);
* whatever the reader or writer raises comes back as `PeerRejected` whose `peer_message` begins
  with the exception's type name; the server goes on serving;
* a reader must return exactly `length` bytes, or the call fails with `PeerRejected`;
* a peer that does not answer within `timeout` seconds of a request raises `PeerUnavailable`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ftd.errors import FtdError

Key = dict[str, Any]
Reader = Callable[[Key, int, int], "memoryview | bytes"]
"""(key, offset, length) -> exactly `length` bytes. Raise (KeyError, ValueError, FtdError, ...) to refuse."""
Writer = Callable[[Key, int, memoryview], None]
"""(key, offset, data): copy `data` into place; the view is only valid during the call."""

DEFAULT_MAX_CHUNK = 8 << 20
"""Largest byte range of one request unless a transport is given another (ftd.knobs.bulk_max_chunk)."""
MAX_KEY_ITEMS = 16
MAX_KEY_NAME = 64
MAX_KEY_STR = 256
MAX_INT = (1 << 63) - 1
MAX_ERROR_TEXT = 2048


class PeerUnavailable(FtdError):
    """A peer daemon did not answer in time, refused the connection, or could not be reached."""


class PeerRejected(FtdError):
    """A peer daemon answered a bulk request with an error; `peer_message` is its text."""

    def __init__(self, message: str, peer_message: str = ""):
        super().__init__(message)
        self.peer_message = peer_message


class BadKey(ValueError):
    """A key that breaks the contract's bounds."""


def check_key(key: Any) -> Key:
    """`key` when it is a valid bulk key; BadKey otherwise."""
    if not isinstance(key, dict):
        raise BadKey(f"key must be a JSON object, got {type(key).__name__}")
    if len(key) > MAX_KEY_ITEMS:
        raise BadKey(f"key has {len(key)} items, at most {MAX_KEY_ITEMS} allowed")
    for name, value in key.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_KEY_NAME:
            raise BadKey(f"key names must have 1..{MAX_KEY_NAME} characters, got {name!r:.80}")
        if isinstance(value, str):
            if len(value) > MAX_KEY_STR:
                raise BadKey(f"key[{name!r}] is longer than {MAX_KEY_STR} characters")
        elif type(value) is not int or not -MAX_INT <= value <= MAX_INT:
            raise BadKey(f"key[{name!r}] must be a string or a 64-bit integer, got {value!r:.40}")
    return key


def error_text(exc: BaseException) -> str:
    """What a refused request answers: the exception's type and text, bounded."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."


def byte_view(buf: memoryview | bytes | bytearray) -> memoryview:
    """A flat unsigned-byte view of a contiguous buffer."""
    view = memoryview(buf)
    if not view.c_contiguous:
        raise ValueError("bulk transfers need a contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class BulkClient(Protocol):
    """Reads and writes byte ranges of one peer's memory. Calls are serialized per client."""

    def get(self, key: Key, offset: int, length: int, timeout: float) -> bytes | memoryview:
        """One piece of at most max_chunk bytes."""

    def get_range(self, key: Key, offset: int, length: int, into: memoryview | bytearray, timeout: float) -> None:
        """`length` bytes at `offset` into `into[:length]`, in pieces."""

    def put(self, key: Key, offset: int, data: memoryview | bytes, timeout: float) -> None:
        """One piece of at most max_chunk bytes at `offset`."""

    def put_range(self, key: Key, offset: int, data: memoryview | bytes, timeout: float) -> None:
        """`data` at `offset`, in pieces."""

    def close(self) -> None:
        """Release the connection; later calls raise PeerUnavailable."""


class BulkTransport(Protocol):
    """Both ends of the bulk plane for one node."""

    def serve(self, reader: Reader, writer: Writer) -> None:
        """Start serving this node's memory through `reader` and `writer`."""

    def connect(self, node: int) -> BulkClient:
        """A client of node `node`'s server (connects lazily; an absent peer fails on use)."""

    def close(self) -> None:
        """Stop serving; clients made by `connect` are closed by their owners."""
