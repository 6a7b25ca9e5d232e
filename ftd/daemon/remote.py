"""Find a rank's snapshot wherever the group holds it, and fetch it from that peer.

When a node is replaced, torchrun may give its ranks other numbers, so a rank can restart on a
node whose daemon never held its snapshots. Its daemon then lists the steps its group peers
report for that rank (heartbeat inventories) and, on Open, pulls the sealed segment and its
manifest over the bulk transport, verifies it against the manifest's checksums and seals it
locally (source "peers"), so the rank restores as if it were local.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ftd.errors import FtdError, NotFound

if TYPE_CHECKING:
    from ftd.daemon.protection import Protector

log = logging.getLogger(__name__)



def holders(protector: Protector, rank: int) -> dict[int, list[int]]:
    """Peer node -> steps it holds for `rank` (from the newest heartbeats of peers that are up)."""
    return {node: sorted(s.step for s in inv.steps) for node, inv in protector.table.inventories().items()
            if rank in inv.ranks and inv.steps}


MAX_MANIFEST_BYTES = 64 << 20


def parse_size(raw: bytes | memoryview, limit: int, what: str) -> int:
    """A peer's 16-byte decimal size of `what`; FtdError when it is not a number in [0, limit]."""
    try:
        size = int(bytes(raw))
    except ValueError:
        raise FtdError(f"peer sent a malformed size of its {what}") from None
    if not 0 <= size <= limit:
        raise FtdError(f"peer announced a {what} of {size} bytes, more than the {limit} allowed")
    return size


def remote_steps(protector: Protector, rank: int) -> list[int]:
    return sorted({step for steps in holders(protector, rank).values() for step in steps})


def fetch(protector: Protector, job: str, rank: int, step: int) -> None:
    """Pull (rank, step) from a peer that holds it and seal it here; NotFound when no peer does."""
    nodes = [node for node, steps in holders(protector, rank).items() if step in steps]
    # A segment is part of a node blob: no peer may make this node allocate more than the largest
    # blob of that step any (authenticated) inventory announced.
    limit = max((s.blob_bytes for inv in protector.table.inventories().values() for s in inv.steps if s.step == step),
                default=0)
    if not nodes:
        raise NotFound(f"no peer of group {list(protector.group.members)} holds rank {rank} step {step}")
    errors = []
    for node in nodes:
        t0 = time.perf_counter()
        link = protector.client(node)
        timeout = protector.transfer_timeout()  # a dead peer costs the peer timeout, then the next one is tried
        key: dict[str, Any] = {"job": job, "rank": rank, "step": step}
        try:
            size = parse_size(link.get({**key, "kind": "segment_manifest_size"}, 0, 16, timeout), MAX_MANIFEST_BYTES,
                              "manifest")
            manifest = bytearray(size)
            link.get_range({**key, "kind": "segment_manifest"}, 0, size, memoryview(manifest), timeout)
            nbytes = parse_size(link.get({**key, "kind": "segment_size"}, 0, 16, timeout), limit,
                                "segment (larger than any blob of the step)")
            data = bytearray(nbytes)
            link.get_range({**key, "kind": "segment"}, 0, nbytes, memoryview(data), timeout)
            protector.store.install_sealed(rank, step, bytes(manifest), memoryview(data), foreign=True)
        except FtdError as exc:
            errors.append(f"node {node}: {exc}")
            log.warning("fetching rank %d step %d from node %d failed: %s", rank, step, node, exc)
            continue
        seconds = time.perf_counter() - t0
        log.info("fetched rank %d step %d from node %d in %.2f s (%d bytes)", rank, step, node, seconds, nbytes)
        return
    raise NotFound(f"rank {rank} step {step} could not be fetched from any peer: {'; '.join(errors)}")


def serve(protector: Protector, key: dict[str, Any], offset: int, length: int) -> bytes:
    """The bulk reader's side: bytes of a locally sealed segment or its manifest."""
    job, rank, step = str(key["job"]), int(key["rank"]), int(key["step"])
    protector.pin_served(step)
    path, _, manifest, _ = protector.store.open(job, rank, step)
    kind = key["kind"]
    if kind == "segment_manifest_size":
        return b"%16d" % len(manifest)
    if kind == "segment_manifest":
        return manifest[offset:offset + length]
    from ftd.manifest import Manifest

    nbytes = Manifest.from_json(manifest).data_bytes
    if kind == "segment_size":
        return b"%16d" % nbytes
    if offset + length > nbytes:
        raise ValueError(f"read past the {nbytes} bytes of rank {rank} step {step}")
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)
