"""The bit-exact comparator of the tests is ftd's own (ftd.demo.bitexact): byte views, not values."""

from ftd.demo.bitexact import byte_view, differing, same_bytes

__all__ = ["byte_view", "differing", "same_bytes"]
