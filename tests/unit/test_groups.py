"""EC group planning, the rotated layout, membership from the peer list, peer authentication."""

from __future__ import annotations

import itertools

import pytest

from ftd.config import DaemonConfig
from ftd.daemon import auth
from ftd.daemon.groups import ECShape, plan_groups, rotations
from ftd.daemon.peers import Membership
from ftd.errors import ConfigError


@pytest.mark.parametrize("nodes,shape", [(n, s) for n in range(2, 20) for s in ("4+2", "3+1", "2+1", "2+2", "8+2")])
def test_every_group_tolerates_m_losses(nodes, shape):
    ec = ECShape.parse(shape)
    if nodes <= ec.m:
        with pytest.raises(ConfigError):
            plan_groups(nodes, ec)
        return
    groups = plan_groups(nodes, ec)
    assert sorted(itertools.chain.from_iterable(g.members for g in groups)) == list(range(nodes))
    for g in groups:
        assert g.m == ec.m and g.k >= 1
        assert g.size >= min(nodes, ec.k + ec.m)


@pytest.mark.parametrize("size,m", [(6, 2), (4, 1), (5, 2), (3, 1), (7, 3), (4, 2)])
def test_rotations_balance_parity_and_data(size, m):
    rots = rotations(size, m)
    k = size - m
    parity_count = [0] * size
    chunks = {pos: [] for pos in range(size)}
    for rot in rots:
        assert len(rot.parity) == m and len(rot.data) == k
        assert not set(rot.parity) & {pos for pos, _ in rot.data}
        assert rot.coordinator == rot.r
        for pos in rot.parity:
            parity_count[pos] += 1
        for pos, chunk in rot.data:
            chunks[pos].append(chunk)
        assert sorted(rot.codec_index(p) for p in range(size)) == list(range(size))
    assert parity_count == [m] * size, "every node holds m parity chunks"
    assert all(sorted(c) == list(range(k)) for c in chunks.values()), "every node contributes each of its k chunks once"


@pytest.mark.parametrize("text", ["4", "4+", "0+2", "4+0", "a+b", "200+100"])
def test_bad_ec_shapes(text):
    with pytest.raises(ConfigError):
        ECShape.parse(text)


def _membership(**overrides) -> Membership:
    values = dict(job="j", peers="node-a.svc:7000,node-b.svc:7000,10.0.0.3:7100", cluster_token="t", ec="2+1")
    values.update(overrides)
    membership = Membership.from_config(DaemonConfig.load(environ={}, **values))
    assert membership is not None
    return membership


def test_membership_by_index_and_by_dns_name():
    assert _membership(node="2").me == 2
    assert _membership(node="node-b").me == 1
    assert _membership(node="node-a.svc:7000").me == 0
    m = _membership(node="10.0.0.3")
    assert m.me == 2 and m.data_endpoint(2) == "tcp://10.0.0.3:7101"
    assert m.listen_addresses("") == ("0.0.0.0:7100", "tcp://0.0.0.0:7101")
    with pytest.raises(ConfigError, match="not in the peer list"):
        _membership(node="elsewhere")
    with pytest.raises(ConfigError, match="outside"):
        _membership(node="5")


def test_peers_need_a_token_and_a_peers_file_works(tmp_path):
    with pytest.raises(ConfigError, match="FTD_CLUSTER_TOKEN"):
        DaemonConfig.load(environ={}, peers="a:1,b:1")
    peers = tmp_path / "peers"
    peers.write_text("# cluster\nh0:7000\nh1:7000\n\nh2:7000\n")
    cfg = DaemonConfig.load(environ={"FTD_PEERS_FILE": str(peers), "FTD_CLUSTER_TOKEN": "t"})
    assert cfg.peer_list == ["h0:7000", "h1:7000", "h2:7000"]


def test_hmac_signatures():
    body = b"\x0a\x02hi"
    value = auth.sign("secret", "job", 3, "/ftd.v1.Peer/Heartbeat", body, now=1000)
    assert auth.verify("secret", "job", "/ftd.v1.Peer/Heartbeat", value, body, now=1001) == 3
    for token, job, method, raw, now in [("other", "job", "/ftd.v1.Peer/Heartbeat", body, 1000),
                                         ("secret", "job2", "/ftd.v1.Peer/Heartbeat", body, 1000),
                                         ("secret", "job", "/ftd.v1.Peer/Other", body, 1000),
                                         ("secret", "job", "/ftd.v1.Peer/Heartbeat", body + b"x", 1000),
                                         ("secret", "job", "/ftd.v1.Peer/Heartbeat", body, 1000 + auth.MAX_SKEW_S + 1)]:
        with pytest.raises(PermissionError):
            auth.verify(token, job, method, value, raw, now=now)
    forged = value.replace(":3:", ":4:", 1)
    with pytest.raises(PermissionError):
        auth.verify("secret", "job", "/ftd.v1.Peer/Heartbeat", forged, body, now=1000)
    for junk in (None, "", "a:b", "1:2:3:4", "v2:1:2:3:4"):
        with pytest.raises(PermissionError):
            auth.verify("secret", "job", "/ftd.v1.Peer/Heartbeat", junk, body, now=1000)