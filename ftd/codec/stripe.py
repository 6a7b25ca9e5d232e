"""Encode and decode long chunks stripe by stripe, so callers can pass 256 MiB chunks safely.

A codec call's cost is not linear in its size: pyeclib copies its input and allocates every
fragment per call, so big calls page-fault and miss the cache, and one 256 MiB call ran ~10x
slower than the same bytes in stripes (MEASURED.md). These helpers cut every chunk into stripes
of `stripe_bytes` *per chunk* (one codec call then sees k·stripe_bytes of input), run the codec
on each stripe, and write the results into one buffer per output chunk. The result is
byte-identical to one call on the whole chunks, because the codes work byte position by byte
position.

The default, 256 KiB per chunk (1 MiB per call for 4+2, 1.5 MiB touched with the parity), is
what bench/codec_bench.py found fastest: ISA-L 4+2 at 64 MiB per chunk encoded at ~5 GB/s in
256-512 KiB stripes, ~3-4 GB/s in 1 MiB, ~1.5 GB/s in 4 MiB, ~0.7 GB/s in 16 MiB and ~0.4 GB/s
in one call; 64 KiB stripes lose ~10% to per-call overhead. Pass a smaller stripe for large k
to keep one call's k·stripe_bytes near a few MiB.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ftd.codec.base import Chunk, Codec, CodecError, byte_view, data_views, plan_decode

#: Bytes of each chunk per codec call (bench/codec_bench.py measures 0.25, 1, 4 and 16 MiB).
DEFAULT_STRIPE_BYTES = 256 << 10


def _check_stripe(stripe_bytes: int) -> None:
    if isinstance(stripe_bytes, bool) or not isinstance(stripe_bytes, int) or stripe_bytes < 1:
        raise CodecError(f"stripe_bytes must be a positive integer, got {stripe_bytes!r}")


def _outputs(out: Sequence[Chunk] | None, count: int, length: int, what: str) -> tuple[list, list[memoryview]]:
    """The caller's output buffers (or new bytearrays) and writable byte views of them."""
    if out is None:
        buffers: list = [bytearray(length) for _ in range(count)]
    else:
        buffers = list(out)
        if len(buffers) != count:
            raise CodecError(f"{what}: out has {len(buffers)} buffers, want {count}")
    views = [byte_view(b, f"{what} output {i}") for i, b in enumerate(buffers)]
    for i, view in enumerate(views):
        if view.readonly or len(view) != length:
            raise CodecError(f"{what} output {i} must be a writable buffer of {length} bytes")
    return buffers, views


def encode_striped(
    codec: Codec,
    data: Sequence[Chunk],
    stripe_bytes: int = DEFAULT_STRIPE_BYTES,
    out: Sequence[Chunk] | None = None,
) -> list:
    """The m parity chunks of k equal-length data chunks, computed `stripe_bytes` at a time.

    Writes into `out` (m writable buffers of the chunk length, e.g. views of a shared-memory
    segment) when given, else into new bytearrays; returns the m output buffers.
    """
    _check_stripe(stripe_bytes)
    views, length = data_views(codec, data)
    buffers, outs = _outputs(out, codec.m, length, "encode")
    for start in range(0, length, stripe_bytes):
        end = min(length, start + stripe_bytes)
        parity = codec._encode([v[start:end] for v in views], end - start)
        for target, part in zip(outs, parity):
            target[start:end] = byte_view(part, "parity")
    return buffers


def decode_striped(
    codec: Codec,
    present: Mapping[int, Chunk],
    want: Sequence[int],
    stripe_bytes: int = DEFAULT_STRIPE_BYTES,
    out: Mapping[int, Chunk] | None = None,
) -> dict[int, object]:
    """Chunks `want` rebuilt from any k chunks in `present`, `stripe_bytes` at a time.

    Same rules as `Codec.decode`. Writes into `out[i]` for each wanted i when given (writable
    buffers of the chunk length), else into new bytearrays; returns {index: buffer}.
    """
    _check_stripe(stripe_bytes)
    plan = plan_decode(codec, present, want)
    order = plan.want
    if out is not None and set(out) != set(order):
        raise CodecError(f"decode: out has buffers for {sorted(out)}, want {sorted(order)}")
    buffers, views = _outputs(None if out is None else [out[i] for i in order], len(order), plan.length, "decode")
    target = dict(zip(order, views))
    for i, chunk in plan.copies.items():
        target[i][:] = chunk
    if plan.missing:
        for start in range(0, plan.length, stripe_bytes):
            end = min(plan.length, start + stripe_bytes)
            sources = {i: v[start:end] for i, v in plan.sources.items()}
            rebuilt = codec._decode(sources, plan.missing, end - start)
            for i in plan.missing:
                target[i][start:end] = byte_view(rebuilt[i], "rebuilt chunk")
    return dict(zip(order, buffers))
