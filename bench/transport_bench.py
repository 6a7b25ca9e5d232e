"""Bulk-transport benchmark: GET and PUT throughput of ftd.daemon.transport over loopback, against memcpy.

    python bench/transport_bench.py [--gib 1] [--chunks 4,8] [--window 4] [--repeats 3] [--inproc] [--json PATH]

The server runs in a child process (as a peer daemon would, with its own GIL) and holds two
preallocated, touched buffers of `--gib` GiB: its Reader serves slices of one (zero-copy
memoryviews), its Writer copies into the other. The client pulls the whole range with
`get_range` into a preallocated buffer and pushes it back with `put_range`, in pieces of each
`--chunks` MiB with `--window` requests in flight, once over CurveZMQ (the default) and once in
plaintext (`curve=False`, which exists only for this comparison). The ceiling is `numpy.copyto`
of the same bytes between two touched buffers in the client process, measured in the same run.
Every transfer is checked (xxh3 of both ends) once per configuration. Each row reports the median
and best of `--repeats` timed runs after a 64 MiB warm-up. `--inproc` runs the server as a thread
of the client process instead (sharing its GIL).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import xxhash
import zmq

from ftd.daemon.transport import BulkClient, BulkServer, curve_keys

MIB, GIB = 1 << 20, 1 << 30
KEY = {"name": "bench"}
TOKEN = "transport-bench-token-4f2a9c1e7b3d5a8f"
TIMEOUT_S = 30.0


def _touched(nbytes: int, seed: int | None = None) -> bytearray:
    buf = bytearray(nbytes)
    arr = np.frombuffer(buf, dtype=np.uint8)
    if seed is None:
        arr.fill(1)
    else:  # incompressible-looking bytes, made fast: a random 1 MiB block, tiled with a per-block twist
        block = np.random.default_rng(seed).integers(0, 256, MIB, dtype=np.uint8)
        view = arr[: nbytes - nbytes % MIB].reshape(-1, MIB)
        view[:] = block
        view ^= (np.arange(view.shape[0], dtype=np.uint64) % 251).astype(np.uint8)[:, None]
        arr[view.size:] = block[: nbytes - view.size]
    return buf


class Peer:
    """The server side: a read buffer, a write buffer, a CURVE server and a plaintext server."""

    def __init__(self, nbytes: int, max_chunk: int):
        self.src = _touched(nbytes, seed=7)
        self.dst = _touched(nbytes)
        src, dst = memoryview(self.src), memoryview(self.dst)

        def reader(key: dict[str, Any], offset: int, length: int) -> memoryview:
            if key != KEY or offset + length > len(src):
                raise ValueError(f"bad range {offset}+{length}")
            return src[offset:offset + length]

        def writer(key: dict[str, Any], offset: int, data: memoryview) -> None:
            if key != KEY or offset + len(data) > len(dst):
                raise ValueError(f"bad range {offset}+{len(data)}")
            dst[offset:offset + len(data)] = data

        keys = curve_keys(TOKEN)
        self.servers = {curve: BulkServer("tcp://127.0.0.1:0", keys, reader, writer, max_chunk, curve=curve)
                        for curve in (True, False)}

    def ports(self) -> dict[bool, int]:
        return {curve: server.port for curve, server in self.servers.items()}

    def digest(self, which: str) -> str:
        return xxhash.xxh3_128_hexdigest(self.src if which == "src" else self.dst)

    def close(self) -> None:
        for server in self.servers.values():
            server.close()


def _peer_process(conn: Any, nbytes: int, max_chunk: int) -> None:
    peer = Peer(nbytes, max_chunk)
    conn.send(peer.ports())
    try:
        while True:
            request = conn.recv()
            if request == "stop":
                break
            conn.send(peer.digest(request))
    finally:
        peer.close()


class RemotePeer:
    """A Peer in a child process, spoken to over a pipe."""

    def __init__(self, nbytes: int, max_chunk: int):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_peer_process, args=(child, nbytes, max_chunk), name="transport-bench-peer")
        self._proc.start()
        if not self._conn.poll(120):
            raise SystemExit("the peer process did not start")
        self._ports = self._conn.recv()

    def ports(self) -> dict[bool, int]:
        return self._ports

    def digest(self, which: str) -> str:
        self._conn.send(which)
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send("stop")
        self._proc.join(30)


def _timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _row(label: str, op: str, chunk: int, nbytes: int, times: list[float]) -> dict[str, Any]:
    return {"transport": label, "op": op, "chunk_mib": chunk / MIB, "bytes": nbytes,
            "median_gbps": nbytes / statistics.median(times) / 1e9, "best_gbps": nbytes / min(times) / 1e9,
            "times_s": times}


def run(args: argparse.Namespace) -> dict[str, Any]:
    nbytes = int(args.gib * GIB)
    chunks = [int(c * MIB) for c in args.chunks]
    peer: Peer | RemotePeer = Peer(nbytes, max(chunks)) if args.inproc else RemotePeer(nbytes, max(chunks))
    try:
        into = _touched(nbytes)
        out = _touched(nbytes, seed=11)
        into_arr, out_arr = np.frombuffer(into, np.uint8), np.frombuffer(out, np.uint8)
        rows = [_row("memcpy (numpy.copyto)", "copy", 0, nbytes,
                     _timed(lambda: np.copyto(into_arr, out_arr), args.repeats + 1)[1:])]
        src_digest, out_digest = peer.digest("src"), xxhash.xxh3_128_hexdigest(out)
        keys = curve_keys(TOKEN)
        for curve in (True, False):
            port = peer.ports()[curve]
            label = "CurveZMQ" if curve else "plaintext"
            for chunk in chunks:
                with BulkClient(f"tcp://127.0.0.1:{port}", keys, max_chunk=chunk, curve=curve) as client:
                    warm = min(nbytes, 64 * MIB)
                    client.get_range(KEY, 0, warm, into, TIMEOUT_S, args.window)
                    client.put_range(KEY, 0, memoryview(out)[:warm], TIMEOUT_S, args.window)

                    into_arr.fill(0)
                    times = _timed(lambda: client.get_range(KEY, 0, nbytes, into, TIMEOUT_S, args.window), args.repeats)
                    if xxhash.xxh3_128_hexdigest(into) != src_digest:
                        raise SystemExit(f"{label} GET {chunk // MIB} MiB: received bytes differ from the peer's")
                    rows.append(_row(label, "GET", chunk, nbytes, times))

                    times = _timed(lambda: client.put_range(KEY, 0, out, TIMEOUT_S, args.window), args.repeats)
                    if peer.digest("dst") != out_digest:
                        raise SystemExit(f"{label} PUT {chunk // MIB} MiB: the peer holds different bytes")
                    rows.append(_row(label, "PUT", chunk, nbytes, times))
                print(f"  done: {label}, {chunk // MIB} MiB pieces", file=sys.stderr, flush=True)
    finally:
        peer.close()
    return {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "loadavg_at_start": os.getloadavg(), "python": platform.python_version(),
                    "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "threads": threading.active_count()},
        "args": vars(args),
        "rows": rows,
    }


def render(doc: dict[str, Any]) -> str:
    memcpy = doc["rows"][0]["median_gbps"]
    lines = ["| transport | op | piece | GB/s median | GB/s best | vs memcpy | s per GiB |", "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        piece = f"{r['chunk_mib']:g} MiB" if r["chunk_mib"] else "-"
        lines.append(f"| {r['transport']} | {r['op']} | {piece} | {r['median_gbps']:.3g} | {r['best_gbps']:.3g} | "
                     f"{r['median_gbps'] / memcpy:.2g}x | {GIB / (r['median_gbps'] * 1e9):.3g} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0, help="GiB per transfer")
    p.add_argument("--chunks", type=lambda s: [float(x) for x in s.split(",")], default=[4.0, 8.0],
                   help="piece sizes in MiB, comma-separated")
    p.add_argument("--window", type=int, default=4, help="requests in flight")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row")
    p.add_argument("--inproc", action="store_true", help="run the server as a thread of this process")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    doc = run(args)
    doc["wall_s"] = time.perf_counter() - t0
    m = doc["machine"]
    print(f"{args.gib:g} GiB per transfer, window {args.window}, {'in-process' if args.inproc else 'peer process'}; "
          f"{m['cores']} cores, pyzmq {m['pyzmq']} / libzmq {m['libzmq']}; {doc['wall_s']:.0f} s")
    print(render(doc))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
