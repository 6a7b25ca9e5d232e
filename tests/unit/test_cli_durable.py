"""`ftd export STEP DIR` and the durable steps of `ftd ls`, with real in-process daemons and real Snapshotters:
an exported step is committed once every rank of the job is written (each node exports its own ranks),
reads back bit for bit, is listed by `ftd ls`, and a step not held or a bad directory is refused."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

import ftd
from ftd import cli
from ftd.client.rpc import DaemonClient
from ftd.config import DaemonConfig
from ftd.daemon.server import Daemon
from ftd.durable import layout, reader
from ftd.durable.reader import DurableStep
from ftd.errors import NotFound, RequestRejected
from tests.unit.snapkit import snap, snapshotter

JOB = "cli-durable"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in [n for n in os.environ if n.startswith("FTD_")]:
        monkeypatch.delenv(name)


def _daemon(tmp_path: Path, node: str = "n0", **settings) -> Daemon:
    config = DaemonConfig.load(environ={}, job=JOB, node=node, socket=str(tmp_path / f"{node}.sock"),
                               shm_dir=str(tmp_path / f"shm-{node}"), memory_reserve="0", metrics_port=0, **settings)
    return Daemon(config).start()


@pytest.fixture
def daemon(tmp_path) -> Iterator[Daemon]:
    d = _daemon(tmp_path)
    try:
        yield d
    finally:
        d.stop(grace=0.5)


def _model(name: str = "body") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({name: torch.nn.Linear(8, 4)})
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train_and_snap(s, model, opt, steps) -> None:
    for step in steps:
        next(iter(model.values()))(torch.randn(2, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        snap(s, step)


def _ftd(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _sealed(daemon: Daemon, step: int) -> tuple[bytes, bytes]:
    """(manifest JSON, data bytes) of rank 0's sealed segment of `step` in shared memory."""
    [(rank, path, data_bytes, manifest_json)] = daemon.store.complete_steps()[step]
    assert rank == 0
    with open(path, "rb") as f:
        return manifest_json, f.read(data_bytes)


def _exported_count(daemon: Daemon, outcome: str) -> float:
    return daemon.metrics.registry.get_sample_value("ftd_durable_steps_total", {"outcome": outcome}) or 0.0


def test_export_commits_a_held_step_that_reads_back_bit_for_bit_and_ftd_ls_lists_it(tmp_path, daemon, capsys):
    model, opt = _model()
    out = tmp_path / "out"
    out.mkdir()
    with snapshotter(daemon.config.socket, model, opt, job=JOB) as s:
        _train_and_snap(s, model, opt, [1, 2, 3])
        sealed = _sealed(daemon, 2)
        rc, stdout, stderr = _ftd(capsys, "export", "2", str(out), "--job", JOB, "--socket", daemon.config.socket)
        assert rc == 0, stderr
        assert "committed" in stdout and "not committed" not in stdout
        root = layout.job_dir(out, JOB)
        assert reader.committed_steps(root) == [2]
        assert DurableStep.open(root, 2).segment(0) == (sealed[0], bytearray(sealed[1]))
        assert _exported_count(daemon, "exported") == 1
        assert daemon.metrics.registry.get_sample_value("ftd_durable_bytes_total") >= len(sealed[1])

        # again: the same snapshots are already there, nothing is rewritten
        rc, stdout, _ = _ftd(capsys, "export", "2", str(out), "--job", JOB, "--socket", daemon.config.socket,
                             "--json")
        assert rc == 0
        doc = json.loads(stdout)
        assert (doc["committed"], doc["already_committed"], doc["bytes"], doc["ranks"]) == (True, True, 0, [0])

        # `ftd ls` lists the durable step beside what memory holds, human and JSON
        shm = str(tmp_path / "shm-n0")
        rc, stdout, _ = _ftd(capsys, "ls", "--shm-dir", shm, "--durable-dir", str(out))
        assert rc == 0
        durable_rows = stdout.split("durable (committed)", 1)[1].splitlines()[1:]
        assert len(durable_rows) == 1 and durable_rows[0].split()[:3] == [JOB, "2", "1"], stdout
        rc, stdout, _ = _ftd(capsys, "ls", "--shm-dir", shm, "--durable-dir", str(out), "--json")
        [job] = json.loads(stdout)
        assert job["job"] == JOB and job["daemon_live"] and job["ranks"] == {"0": [2, 3]}
        [entry] = job["durable"]
        assert entry["dir"] == str(root)
        assert [(d["step"], d["world_size"]) for d in entry["steps"]] == [(2, 1)]
        assert entry["steps"][0]["bytes"] >= len(sealed[1]) and entry["steps"][0]["committed_at"] > 0


def test_ftd_ls_finds_the_durable_directory_through_the_live_daemon(tmp_path, capsys, monkeypatch):
    durable = tmp_path / "durable"
    d = _daemon(tmp_path, durable_dir=str(durable), durable_every=1000)  # the cadence writes nothing here
    try:
        model, opt = _model()
        with snapshotter(d.config.socket, model, opt, job=JOB) as s:
            _train_and_snap(s, model, opt, [1, 2])
            rc, stdout, stderr = _ftd(capsys, "export", "1", "--job", JOB, "--socket", d.config.socket,
                                      "--durable-dir", str(durable))  # DIR defaults to the durable directory
            assert rc == 0, stderr
        monkeypatch.setenv("FTD_SOCKET", d.config.socket)  # how `ftd ls` reaches the job's daemon
        rc, stdout, _ = _ftd(capsys, "ls", "--shm-dir", str(tmp_path / "shm-n0"), "--json")
        [job] = json.loads(stdout)
        assert [(e["dir"], [s["step"] for s in e["steps"]]) for e in job["durable"]] == [
            (str(layout.job_dir(durable, JOB)), [1])]
    finally:
        d.stop(grace=0.5)


def test_each_node_exports_its_own_ranks_and_the_last_one_commits(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    nodes = [_daemon(tmp_path, f"n{i}") for i in range(2)]
    try:
        snaps = []
        for rank, d in enumerate(nodes):  # two pipeline stages, one per node: different parameters
            model, opt = _model(f"stage{rank}")
            snaps.append((ftd.Snapshotter(model, opt, rank=rank, world_size=2, job=JOB, socket=d.config.socket),
                          model, opt))
        try:
            for s, model, opt in snaps:
                _train_and_snap(s, model, opt, [5])
        finally:
            for s, _, _ in snaps:
                s.close()
        rc, stdout, stderr = _ftd(capsys, "export", "5", str(out), "--job", JOB, "--socket", nodes[0].config.socket,
                                  "--json")
        assert rc == 0, stderr
        first = json.loads(stdout)
        assert (first["ranks"], first["committed"], first["missing_ranks"], first["world_size"]) == ([0], False, [1], 2)
        assert reader.committed_steps(layout.job_dir(out, JOB)) == []
        rc, stdout, stderr = _ftd(capsys, "export", "5", str(out), "--job", JOB, "--socket", nodes[1].config.socket)
        assert rc == 0, stderr
        assert "wrote ranks [1] of step 5" in stdout and "is committed: all 2 ranks" in stdout
        step = DurableStep.open(layout.job_dir(out, JOB), 5)
        for rank, d in enumerate(nodes):
            [(_, path, data_bytes, manifest_json)] = d.store.complete_steps()[5]
            with open(path, "rb") as f:
                assert step.segment(rank) == (manifest_json, bytearray(f.read(data_bytes)))
    finally:
        for d in nodes:
            d.stop(grace=0.5)


def test_export_refuses_a_step_not_held_and_a_bad_directory(tmp_path, daemon, capsys):
    model, opt = _model()
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "link").symlink_to(out)
    (tmp_path / "file").write_bytes(b"")
    with snapshotter(daemon.config.socket, model, opt, job=JOB) as s:
        _train_and_snap(s, model, opt, [1, 2])
        rc, stdout, stderr = _ftd(capsys, "export", "7", str(out), "--job", JOB, "--socket", daemon.config.socket)
        assert rc == 2 and "step 7 is not held" in stderr and "[1, 2]" in stderr, stderr
        client = DaemonClient(daemon.config.socket, JOB, -1, 10.0)
        try:
            with pytest.raises(NotFound, match="step 7 is not held"):
                client.export(7, str(out), 10.0)
            with pytest.raises(RequestRejected, match=f"{grpc.StatusCode.INVALID_ARGUMENT.name}.*absolute path"):
                client.export(2, "out", 10.0)
            for bad, why in ((tmp_path / "missing", "create it first"), (tmp_path / "link", "is a symlink"),
                             (tmp_path / "file", "not a directory")):
                with pytest.raises(RequestRejected, match=f"{grpc.StatusCode.FAILED_PRECONDITION.name}.*{why}"):
                    client.export(2, str(bad), 10.0)
        finally:
            client.close()
    assert not any(out.iterdir()), "a refused export writes nothing"
    assert _exported_count(daemon, "exported") == 0
