"""Every Prometheus metric of the daemon, defined once, units in the names.

Each daemon owns a `DaemonMetrics` with its own registry (several daemons can live in one test
process). Labels are low-cardinality: rank and reason, never step.
"""

from __future__ import annotations

import logging
import os

import psutil
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from ftd.errors import ConfigError

log = logging.getLogger(__name__)

_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _CpuCollector(Collector):
    """ftd_process_cpu_seconds_total: user + system CPU time of the daemon (psutil)."""

    def __init__(self, proc: psutil.Process):
        self.proc = proc

    def collect(self) -> Iterator[CounterMetricFamily]:
        times = self.proc.cpu_times()
        family = CounterMetricFamily("ftd_process_cpu_seconds", "Daemon CPU time (user + system)")
        family.add_metric([], times.user + times.system)
        yield family


class DaemonMetrics:
    """The daemon's metrics and the registry they live in."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.snapshots_sealed = Counter("ftd_snapshots_sealed", "Snapshots sealed", ["rank"], registry=r)
        self.snapshot_bytes = Counter("ftd_snapshot_bytes", "Bytes of sealed snapshots", ["rank"], registry=r)
        self.snapshots_aborted = Counter("ftd_snapshots_aborted", "Snapshots begun and not sealed", ["reason"], registry=r)
        self.refused = Counter("ftd_refused_snapshots", "Snapshots refused", ["reason"], registry=r)
        self.commit_latency = Histogram("ftd_commit_latency_seconds", "From begin to sealed",
                                        buckets=_SECONDS_BUCKETS, registry=r)
        self.client_stall = Histogram("ftd_client_stall_seconds", "Time optimizer.step waited for a copy",
                                      buckets=_SECONDS_BUCKETS, registry=r)
        self.client_copy = Histogram("ftd_client_copy_seconds", "Time a rank spent copying a snapshot",
                                     buckets=_SECONDS_BUCKETS, registry=r)
        self.newest_sealed_step = Gauge("ftd_newest_sealed_step", "Newest sealed step", ["rank"], registry=r)
        self.segments_adopted = Counter("ftd_segments_adopted", "Sealed segments re-adopted at start", registry=r)
        self.segments_prepared = Counter("ftd_segments_prepared", "Segments allocated and pre-faulted ahead, at "
                                         "the size a rank announced in Hello", registry=r)
        self.segments_dropped = Counter("ftd_segments_dropped", "Half-written segments dropped at start", registry=r)
        self.stale_timeline_steps = Gauge("ftd_stale_timeline_steps", "Higher steps of an older timeline kept "
                                          "after a fresh start (until restored or discarded)", ["rank"], registry=r)
        self.shm_entries_skipped = Counter("ftd_shm_entries_skipped", "Stray or unsafe entries in the shm directory "
                                           "skipped (symlinks, non-regular files, unreadable)", ["reason"], registry=r)
        self.restores_served = Counter("ftd_restores_served", "Sealed snapshots opened for restore", registry=r)
        self.shm_held_bytes = Gauge("ftd_shm_held_bytes", "Bytes of shared-memory segments held", registry=r)
        self.shm_budget_bytes = Gauge("ftd_shm_budget_bytes", "Configured segment budget (0: none)", registry=r)
        self.peer_up = Gauge("ftd_peer_up", "Peer answered heartbeats within the timeout", ["peer"], registry=r)
        self.peer_refused = Counter("ftd_peer_refused", "Peer calls refused (authentication, job)", registry=r)
        self.thread_errors = Counter("ftd_thread_errors", "Exceptions caught (and survived) in a background thread",
                                     ["thread"], registry=r)
        self.parity_held_bytes = Gauge("ftd_parity_held_bytes", "Bytes of parity chunks held", registry=r)
        self.protected_step = Gauge("ftd_newest_protected_step", "Newest step protected in this node's group",
                                    registry=r)
        self.group_protected = Gauge("ftd_group_protected", "1 when the group holds a protected step", registry=r)
        self.ec_encode_seconds = Histogram("ftd_ec_encode_seconds", "Seconds to encode one rotation of a step",
                                           buckets=_SECONDS_BUCKETS, registry=r)
        self.ec_encode_bytes = Counter("ftd_ec_encode_bytes", "Data bytes erasure-encoded", registry=r)
        self.ec_decode_bytes = Counter("ftd_ec_decode_bytes", "Bytes rebuilt by erasure decoding", registry=r)
        self.peer_sent_bytes = Counter("ftd_peer_sent_bytes", "Bulk bytes sent to a peer", ["peer"], registry=r)
        self.peer_received_bytes = Counter("ftd_peer_received_bytes", "Bulk bytes received from a peer", ["peer"],
                                           registry=r)
        self.snapshot_age = Gauge("ftd_snapshot_age_seconds", "Seconds since the rank's newest snapshot was sealed",
                                  ["rank"], registry=r)
        self.recoveries = Counter("ftd_recoveries", "Restores completed by ranks, by source", ["source"], registry=r)
        self.recovery_seconds = Histogram("ftd_recovery_seconds", "Duration of a rank's restore, by source",
                                          ["source"], buckets=_SECONDS_BUCKETS, registry=r)
        self.rebuild_progress = Gauge("ftd_rebuild_progress_ratio", "Fraction of the current rebuild done",
                                      registry=r)
        self.rebuild_seconds = Histogram("ftd_rebuild_seconds", "Duration of completed rebuilds",
                                         buckets=_SECONDS_BUCKETS, registry=r)
        self.prefault_seconds = Histogram("ftd_prefault_seconds", "Seconds to allocate and touch a new segment",
                                          buckets=_SECONDS_BUCKETS, registry=r)
        self.seal_to_protected = Histogram("ftd_seal_to_protected_seconds", "From the local seal of a step to "
                                           "its protection across the group", buckets=_SECONDS_BUCKETS, registry=r)
        self.protection_lag_steps = Gauge("ftd_protection_lag_steps", "Newest sealed step minus the newest "
                                          "protected step (-1: nothing protected yet)", registry=r)
        self.protection_lag_steps.set(-1)
        self.protection_lag_seconds = Gauge("ftd_protection_lag_seconds", "Seconds between the local seals of the "
                                            "newest protected step and the newest sealed step (-1: nothing "
                                            "protected yet)", registry=r)
        self.protection_lag_seconds.set(-1)
        self.protection_targets = Counter("ftd_protection_targets", "Steps this node announced to its group as the "
                                          "next to protect, by why: first, protected (the previous one was), "
                                          "mismatch (members held different steps), stalled",
                                          ["reason"], registry=r)
        self.rebuilds = Counter("ftd_rebuilds", "Rebuild checks of this node by outcome: rebuilt, nothing (no "
                                "protected step in the group), unrecoverable (more than m nodes lost), failed",
                                ["outcome"], registry=r)
        self.rebuilt_step = Gauge("ftd_rebuilt_step", "Step this node last rebuilt from peers (-1: none)",
                                  registry=r)
        self.rebuilt_step.set(-1)
        self.checksum_failures = Counter("ftd_checksum_failures", "Pieces that failed their checksum",
                                         ["kind"], registry=r)
        self.adoptions = Counter("ftd_adoptions", "Lost group members' steps decoded here for a job that went on "
                                 "without them, by outcome: adopted, failed", ["outcome"], registry=r)
        self.adopted_bytes = Counter("ftd_adopted_bytes", "Bytes of lost members' rank data decoded here",
                                     registry=r)
        self.reshards = Counter("ftd_reshards", "Restores of this node's ranks onto another world size from memory",
                                registry=r)
        self.reshard_bytes = Counter("ftd_reshard_bytes", "Bytes the ranks read to reshard, by where they were: "
                                     "local (this node's memory), peers (read from another node), decoded (of "
                                     "those, a lost node's data decoded by a survivor)", ["source"], registry=r)
        self.reshard_seconds = Histogram("ftd_reshard_seconds", "Duration of a rank's reshard from memory",
                                         buckets=_SECONDS_BUCKETS, registry=r)
        self.durable_step = Gauge("ftd_durable_step", "Newest step committed to the durable tier (-1: none)",
                                  registry=r)
        self.durable_step.set(-1)
        self.durable_lag_steps = Gauge("ftd_durable_lag_steps", "Newest sealed step minus the newest durable step",
                                       registry=r)
        self.durable_bytes = Counter("ftd_durable_bytes", "Bytes this daemon wrote to the durable tier", registry=r)
        self.durable_write_seconds = Histogram("ftd_durable_write_seconds", "Seconds to write (and fsync) this "
                                               "node's ranks of one step", buckets=_SECONDS_BUCKETS, registry=r)
        self.seal_to_durable = Histogram("ftd_seal_to_durable_seconds", "From the local seal of a step to its "
                                         "commit in the durable tier", buckets=_SECONDS_BUCKETS, registry=r)
        self.durable_steps = Counter("ftd_durable_steps", "Steps handled by the durable tier by outcome: written "
                                     "(this node's ranks), committed, skipped (a newer step came first), failed, "
                                     "exported (this node's ranks, by `ftd export`), export_failed",
                                     ["outcome"], registry=r)
        self.durable_restores = Counter("ftd_durable_restores", "Segments brought back from the durable tier",
                                        registry=r)
        self.host_available_bytes = Gauge("ftd_host_memory_available_bytes", "Host memory available (psutil)",
                                          registry=r)
        self.host_available_bytes.set_function(lambda: psutil.virtual_memory().available)
        proc = psutil.Process(os.getpid())
        Gauge("ftd_process_rss_bytes", "Daemon resident memory", registry=r).set_function(
            lambda: proc.memory_info().rss)
        Gauge("ftd_process_threads", "Daemon threads", registry=r).set_function(proc.num_threads)
        r.register(_CpuCollector(proc))

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose the registry on http://addr:port/metrics (0: do nothing).

        ConfigError when the address cannot be bound: a daemon whose monitoring silently went
        missing would look healthy while nobody sees it.
        """
        if port <= 0:
            return
        try:
            self._http = start_http_server(port, addr=addr, registry=self.registry)
        except (OSError, OverflowError) as exc:
            raise ConfigError(f"cannot serve metrics on {addr}:{port} ({exc}): free the port, or set FTD_METRICS_PORT "
                              f"to a free one (0: no metrics) or FTD_METRICS_ADDRESS to an address of this "
                              f"host") from None
        log.info("metrics on http://%s:%d/metrics", addr, port)

    def close(self) -> None:
        """Stop the HTTP endpoint, if one is running."""
        http = getattr(self, "_http", None)
        if http is not None:
            server, thread = http
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._http = None
