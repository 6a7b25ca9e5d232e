"""Codec names: `make_codec("isal" | "reedsolo" | "auto", k, m)` and which are available here."""

from __future__ import annotations

from ftd.codec.base import Codec, CodecError
from ftd.codec.isal import IsalCodec, pyeclib_available
from ftd.codec.reedsolo import ReedSoloCodec

#: Every codec ftd knows, fastest first.
CODECS: dict[str, type[Codec]] = {"isal": IsalCodec, "reedsolo": ReedSoloCodec}
AUTO = "auto"


def available_codecs() -> list[str]:
    """The codec names that can be built in this process, fastest first."""
    return [name for name in CODECS if name != "isal" or pyeclib_available()]


def make_codec(name: str, k: int, m: int) -> Codec:
    """Build codec `name` for k data and m parity chunks.

    "auto" picks isal when pyeclib is importable, else reedsolo (which logs a warning). The
    result's `.name` is the concrete codec: record that in group metadata, since parity written
    by one codec cannot be decoded by another.
    """
    if name == AUTO:
        name = available_codecs()[0]
    try:
        cls = CODECS[name]
    except (KeyError, TypeError):
        known = ", ".join([*CODECS, AUTO])
        raise CodecError(f"unknown codec {name!r}; known: {known}") from None
    return cls(k, m)
