"""Fixtures of the integration tests (see cluster.py)."""

from tests.integration.cluster import node, reference  # noqa: F401
