"""The daemon process under bad input and tight memory: clear errors, nothing lost, nothing crashes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import grpc
import pytest

from ftd._proto import snapshot_pb2 as pb
from ftd._proto import snapshot_pb2_grpc as pb_grpc
from ftd.client.rpc import DaemonClient
from ftd.errors import RequestRejected

from ftd.demo import results
from ftd.demo.cluster import LocalNode

from tests.integration.cluster import STEPS, TRAIN_ARGS


def _stub(node: LocalNode) -> tuple[grpc.Channel, pb_grpc.SnapshotStub]:
    channel = grpc.insecure_channel(f"unix:{node.env['FTD_SOCKET']}")
    return channel, pb_grpc.SnapshotStub(channel)


def test_malformed_requests_get_clear_errors_and_the_daemon_survives(node: LocalNode):
    node.run_trainer([*TRAIN_ARGS, "--stop-at", "3"])
    channel, stub = _stub(node)
    job = node.env["FTD_JOB"]
    try:
        lease = stub.Begin(pb.BeginRequest(job=job, rank=0, step=4, nbytes=4096), timeout=5)
        cases = [
            (stub.Commit, pb.CommitRequest(job=job, rank=0, step=4, lease=lease.lease, manifest_json=b"{not json"),
             grpc.StatusCode.INVALID_ARGUMENT, "not valid JSON"),
            (stub.Commit, pb.CommitRequest(job=job, rank=0, step=4, lease=lease.lease + 1, manifest_json=b"{}"),
             grpc.StatusCode.INVALID_ARGUMENT, "format"),
            (stub.Begin, pb.BeginRequest(job="other-job", rank=0, step=1, nbytes=10),
             grpc.StatusCode.FAILED_PRECONDITION, "serves job"),
            (stub.Begin, pb.BeginRequest(job=job, rank=-1, step=1, nbytes=10),
             grpc.StatusCode.FAILED_PRECONDITION, "out of range"),
            (stub.Begin, pb.BeginRequest(job=job, rank=0, step=1, nbytes=0),
             grpc.StatusCode.FAILED_PRECONDITION, "positive"),
            (stub.Open, pb.OpenRequest(job=job, rank=0, step=999), grpc.StatusCode.NOT_FOUND, "not held"),
        ]
        for call, request, code, text in cases:
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=5)
            assert err.value.code() == code and text in err.value.details(), (request, err.value.details())
    finally:
        channel.close()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:  # garbage that is not even HTTP/2
        raw.connect(node.env["FTD_SOCKET"])
        raw.sendall(b"\x00\xff" * 5000)
    client = DaemonClient(node.env["FTD_SOCKET"], node.env["FTD_JOB"], 0, timeout=5)
    try:
        # step 4's Begin took step 2's segment (keep 2 in two segments): the newest sealed step stays
        assert client.list_steps() == [3], "the sealed steps must survive bad requests"
        with pytest.raises(RequestRejected, match="serves job"):
            DaemonClient(node.env["FTD_SOCKET"], "other-job", 0, timeout=5).hello(1)
    finally:
        client.close()
    assert node.daemon.proc.poll() is None


def test_memory_budget_refuses_with_a_clear_error_and_training_continues(node: LocalNode):
    node.daemon.kill()
    node.env["FTD_MEMORY_BUDGET"] = "1MiB"
    node.start_daemon()
    node.run_trainer([*TRAIN_ARGS, "--stop-at", "5"])
    done = results.latest(node.results(), "done")[0]
    assert (done["sealed"], done["last_step"], done["skip_reasons"]) == (0, 5, {"out_of_memory": 5}), done
    assert node.metrics().value("ftd_refused_snapshots_total") == 5


def test_ftd_status_reports_held_steps(node: LocalNode):
    node.run_trainer([*TRAIN_ARGS, "--stop-at", "4"])
    out = subprocess.run([sys.executable, "-m", "ftd", "status", "--json"], env=node.env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    doc = json.loads(out)
    assert doc["job"] == node.env["FTD_JOB"]
    assert doc["ranks"][0]["rank"] == 0 and doc["ranks"][0]["sealed_steps"] == [3, 4]
    assert doc["held_bytes"] >= 3 * doc["ranks"][0]["held_bytes"] // 3 > 0
    human = subprocess.run([sys.executable, "-m", "ftd", "status"], env=node.env, capture_output=True, text=True,
                           timeout=60, check=True).stdout
    assert "[3, 4]" in human and STEPS > 4


@pytest.mark.parametrize("same", ["socket", "shm"])
def test_second_daemon_is_refused(node: LocalNode, same: str):
    node.run_trainer([*TRAIN_ARGS, "--stop-at", "3"])
    env = dict(node.env)
    if same == "shm":
        env["FTD_SOCKET"] = str(node.root / "second.sock")
    second = subprocess.run([sys.executable, "-m", "ftd", "daemon"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert second.returncode == 2
    assert "another daemon" in second.stderr, second.stderr
    client = DaemonClient(node.env["FTD_SOCKET"], node.env["FTD_JOB"], 0, timeout=5)
    try:
        assert client.list_steps() == [2, 3], "the first daemon's snapshots must be untouched"
    finally:
        client.close()
