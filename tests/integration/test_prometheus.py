"""A real Prometheus server scrapes a real daemon during a short training run."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from ftd.demo.cluster import LocalNode

from tests.integration.cluster import TRAIN_ARGS, free_port

PROMETHEUS = shutil.which("prometheus")


def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as reply:
        doc = json.load(reply)
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def _wait_for(port: int, expr: str, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = _query(port, expr)
            if result:
                return result
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"Prometheus never returned {expr!r}")
        time.sleep(0.5)


@pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus binary is not installed (.ci/run installs "
                                               "Debian's prometheus package; apt-get was not available here)")
def test_prometheus_scrapes_snapshot_and_stall_metrics(node: LocalNode, tmp_path: Path):
    metrics_port, prom_port = int(node.env["FTD_METRICS_PORT"]), free_port()  # the node's daemon serves metrics
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: ftd
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
""")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "prometheus.log", "wb"))
    try:
        proc = node.trainer([*TRAIN_ARGS, "--step-sleep", "0.2", "--stop-at", "15"])
        up = _wait_for(prom_port, 'up{job="ftd"} == 1')
        assert up[0]["metric"]["instance"] == f"127.0.0.1:{metrics_port}"
        assert proc.wait(120) == 0
        sealed = _wait_for(prom_port, 'ftd_snapshots_sealed_total{rank="0"} >= 15')
        assert float(sealed[0]["value"][1]) == 15
        stall_count = _wait_for(prom_port, "ftd_client_stall_seconds_count >= 10")
        assert float(stall_count[0]["value"][1]) >= 10
        mean_stall = float(_query(prom_port, "ftd_client_stall_seconds_sum / ftd_client_stall_seconds_count")[0]
                           ["value"][1])
        assert 0 <= mean_stall < 1.0, f"implausible mean stall {mean_stall}"
        nbytes = float(_wait_for(prom_port, 'ftd_snapshot_bytes_total{rank="0"} > 0')[0]["value"][1])
        assert 15 * 1_000_000 < nbytes < 15 * 4_000_000, f"implausible snapshot bytes {nbytes}"
        step = float(_wait_for(prom_port, 'ftd_newest_sealed_step{rank="0"} == 15')[0]["value"][1])
        assert step == 15
        age = float(_wait_for(prom_port, 'ftd_snapshot_age_seconds{rank="0"} >= 0')[0]["value"][1])
        assert 0 <= age < 120
        assert float(_wait_for(prom_port, "ftd_process_rss_bytes > 0")[0]["value"][1]) > 10e6
        assert _wait_for(prom_port, "ftd_process_cpu_seconds_total > 0")
        assert float(_wait_for(prom_port, "ftd_shm_held_bytes > 0")[0]["value"][1]) >= nbytes / 15
    finally:
        prom.terminate()
        prom.wait(30)
