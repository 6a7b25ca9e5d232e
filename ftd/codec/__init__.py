"""Erasure codecs for EC groups: k data chunks -> m parity chunks, and any k chunks -> the rest.

    codec = make_codec("auto", k=4, m=2)
    parity = encode_striped(codec, data_chunks)             # chunks of any size, 256 KiB stripes
    lost = decode_striped(codec, {0: d0, 2: d2, 4: p0, 5: p1}, want=[1, 3])

Parity is specific to the codec: a group must agree on `codec.name` (keep it in metadata).
"""

from ftd.codec.base import Codec, CodecError
from ftd.codec.registry import available_codecs, make_codec
from ftd.codec.stripe import DEFAULT_STRIPE_BYTES, decode_striped, encode_striped

__all__ = [
    "DEFAULT_STRIPE_BYTES",
    "Codec",
    "CodecError",
    "available_codecs",
    "decode_striped",
    "encode_striped",
    "make_codec",
]
