"""Erasure-codec benchmark: encode and rebuild throughput of each ftd codec on one core, against memcpy.

    python bench/codec_bench.py [--mib 64] [--repeats 5] [--k 4] [--m 2] [--cpu 0]

Throughput is GB/s of *group data*: k chunks of `--mib` MiB each (256 MiB for 4+2 at 64 MiB),
whether encoding them into m parity chunks or rebuilding lost chunks from k survivors. Rows:

* memcpy: `numpy.copyto` of the same k·L bytes into an already-touched buffer (the ceiling);
* isal through `encode_striped` / `decode_striped` with stripes of 256 KiB, 1, 4 and 16 MiB
  per chunk, and as one unstriped call;
* reedsolo (ftd's codec: reedsolo-derived coefficients applied with bytes.translate + numpy
  XOR) through the striped helpers;
* reedsolo called byte position by byte position (the literal use of the package), on 64 KiB
  chunks only, extrapolated: it runs at about 1 MB/s.

Outputs go into buffers that are allocated and touched once and reused, like a daemon's
shared-memory segments, so first-touch page faults of fresh outputs are not counted (they are
the caller's). pyeclib's own per-call allocations are counted; they page-fault less with glibc
told not to trim or mmap them (MALLOC_MMAP_THRESHOLD_=134217728 MALLOC_TRIM_THRESHOLD_=1073741824
in the environment), which the JSON records.

Rebuild rows lose one data chunk (rebuilt from 3 data + 1 parity) and two data chunks (from
2 data + 2 parity). Every rebuild is checked against the original bytes. The process is pinned
to one CPU (`--cpu`); each row reports the median and the best of `--repeats` runs, as other
work on the machine skews single runs. Writes bench/results/codec-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import reedsolo

from ftd.codec import available_codecs, decode_striped, encode_striped, make_codec
from ftd.codec.base import Codec

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 1 << 20


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    fn()  # warm-up: first-touch of outputs, header and coefficient caches
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def _row(label: str, op: str, data_bytes: int, times: list[float], note: str = "") -> dict[str, Any]:
    return {
        "codec": label,
        "op": op,
        "data_bytes": data_bytes,
        "median_gbps": data_bytes / statistics.median(times) / 1e9,
        "best_gbps": data_bytes / min(times) / 1e9,
        "times_s": times,
        "note": note,
    }


def bench_memcpy(data: list[np.ndarray], repeats: int) -> dict[str, Any]:
    src = np.concatenate(data)
    dst = np.ones_like(src)
    times, _ = _timed(lambda: np.copyto(dst, src), repeats)
    return _row("memcpy", "copy", src.nbytes, times)


def _touched(count: int, length: int) -> list[bytearray]:
    buffers = [bytearray(length) for _ in range(count)]
    for b in buffers:
        np.frombuffer(b, dtype=np.uint8).fill(1)
    return buffers


def bench_codec(codec: Codec, label: str, data: list[bytes], stripe: int, repeats: int) -> list[dict[str, Any]]:
    k, length = codec.k, len(data[0])
    group = k * length
    outs = _touched(codec.m, length)
    times, parity = _timed(lambda: encode_striped(codec, data, stripe_bytes=stripe, out=outs), repeats)
    rows = [_row(label, "encode", group, times)]
    every = list(data) + [bytes(p) for p in parity]
    for lost in ([0], [0, 1]):
        present = {i: every[i] for i in range(k + codec.m) if i not in lost}  # the codec uses the lowest k
        target = dict(zip(lost, outs))
        times, rebuilt = _timed(lambda: decode_striped(codec, present, lost, stripe_bytes=stripe, out=target), repeats)
        if any(bytes(rebuilt[i]) != every[i] for i in lost):
            raise SystemExit(f"{label}: rebuilt chunks {lost} differ from the originals")
        rows.append(_row(label, f"rebuild {len(lost)} of {k}", group, times))
    return rows


def bench_reedsolo_bytewise(k: int, m: int, length: int) -> list[dict[str, Any]]:
    """reedsolo's encode and erasure decode, one message per byte position, as the package is meant to be used."""
    rng = np.random.default_rng(1)
    data = [rng.integers(0, 256, length, dtype=np.uint8).tobytes() for _ in range(k)]
    rsc = reedsolo.RSCodec(nsym=m, nsize=k + m)
    t0 = time.perf_counter()
    codewords = [rsc.encode(bytearray(column)) for column in zip(*data)]
    encode_s = time.perf_counter() - t0
    lost = [0]
    t0 = time.perf_counter()
    for word in codewords:
        rsc.decode(bytearray(word), erase_pos=lost, only_erasures=True)
    decode_s = time.perf_counter() - t0
    note = f"{length >> 10} KiB chunks, one call per byte position"
    return [
        _row("reedsolo byte by byte", "encode", k * length, [encode_s], note),
        _row("reedsolo byte by byte", f"rebuild 1 of {k}", k * length, [decode_s], note),
    ]


def render(rows: list[dict[str, Any]], memcpy_gbps: float, group_bytes: int) -> str:
    header = f"| codec, call pattern | operation | GB/s median | GB/s best | vs memcpy | s per {group_bytes / MIB:.0f} MiB group |"
    lines = [header, "|---|---|---|---|---|---|"]
    for r in rows:
        per_group = group_bytes / (r["median_gbps"] * 1e9)
        label = r["codec"] + (f" ({r['note']})" if r["note"] else "")
        lines.append(
            f"| {label} | {r['op']} | {r['median_gbps']:.3g} | {r['best_gbps']:.3g} | "
            f"{r['median_gbps'] / memcpy_gbps:.2g}x | {per_group:.3g} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    k, m, length = args.k, args.m, args.mib * MIB
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, length, dtype=np.uint8) for _ in range(k)]
    data = [a.tobytes() for a in arrays]
    rows = [bench_memcpy(arrays, args.repeats)]
    memcpy_gbps = rows[0]["median_gbps"]
    if "isal" in available_codecs():
        isal = make_codec("isal", k, m)
        for stripe in [s for s in (256 << 10, 1 * MIB, 4 * MIB, 16 * MIB) if s < length] + [length]:
            label = f"isal, {stripe / MIB:g} MiB stripes" if stripe < length else "isal, one call"
            rows += bench_codec(isal, label, data, stripe, args.repeats)
    else:
        print("pyeclib is not importable: no isal rows (pip install pyeclib)", file=sys.stderr)
    rs = make_codec("reedsolo", k, m)
    for stripe in [s for s in (256 << 10, 4 * MIB) if s < length] or [length]:
        rows += bench_codec(rs, f"reedsolo (ftd), {stripe / MIB:g} MiB stripes", data, stripe, max(1, args.repeats // 2))
    rows += bench_reedsolo_bytewise(k, m, 64 << 10)
    return {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "pinned_cpu": args.cpu,
            "loadavg_at_start": os.getloadavg(),
            "python": platform.python_version(),
            "pyeclib": _version("pyeclib"),
            "reedsolo": _version("reedsolo"),
            "numpy": np.__version__,
            "malloc_env": {key: value for key, value in os.environ.items() if key.startswith("MALLOC_")},
        },
        "args": vars(args),
        "memcpy_gbps": memcpy_gbps,
        "group_bytes": k * length,
        "rows": rows,
    }


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--k", type=int, default=4, help="data chunks")
    p.add_argument("--m", type=int, default=2, help="parity chunks")
    p.add_argument("--mib", type=int, default=64, help="MiB per chunk")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row (after one warm-up)")
    p.add_argument("--cpu", type=int, default=0, help="pin to this CPU (one core)")
    p.add_argument("--no-json", action="store_true", help="do not write bench/results/codec-<date>.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    doc = run(args)
    doc["total_s"] = time.perf_counter() - t0
    print(f"{args.k}+{args.m}, {args.mib} MiB per chunk, one core; GB/s of group data (k chunks)\n")
    print(render(doc["rows"], doc["memcpy_gbps"], doc["group_bytes"]))
    print(f"\nwhole run {doc['total_s']:.0f} s, load average at start {doc['machine']['loadavg_at_start'][0]:.2f}")
    if not args.no_json:
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"codec-{datetime.date.today().isoformat()}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
