"""One agreed step per round (ftd.daemon.protection): nodes that seal at different moments all encode
the same step, so every encode protects a step and protection keeps up with fast steps."""

from __future__ import annotations

import time

import pytest

from tests.unit.ecnodes import metric

pytestmark = pytest.mark.timeout(60)


def test_nodes_sealing_at_different_moments_all_encode_the_same_newest_step(cluster_of) -> None:
    c = cluster_of(3, "2+1", heartbeat_interval=0.1)
    period, stagger, steps = 0.04, 0.012, 60
    lags = []
    for step in range(1, steps + 1):
        t0 = time.monotonic()
        for i in range(3):  # every node seals each step, each at its own moment, in a rotating order
            c.seal(step, [(step + i) % 3])
            time.sleep(stagger)
        protected = min(ec.protector.protected_step for ec in c.nodes.values())
        if protected >= 0:
            lags.append(step - protected)
        time.sleep(max(0.0, period - (time.monotonic() - t0)))
    c.wait_protected(steps, timeout=10)
    for node, ec in c.nodes.items():
        encodes = metric(ec, "ftd_ec_encode_seconds_count")
        protections = metric(ec, "ftd_seal_to_protected_seconds_count")
        # each encode is of the group's agreed step, so each protects a step (before, nodes encoded
        # different steps and only the ones they happened to share became protected)
        assert encodes <= protections + 1, (node, encodes, protections)
        assert protections >= 3, (node, protections)  # progress (about 20 on a quiet machine, 5 seen at load 10)
    assert lags and max(lags[len(lags) // 3:]) <= 20, lags  # a step every 40 ms: lag in steps, not a speed target
