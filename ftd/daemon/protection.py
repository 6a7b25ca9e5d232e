"""The protection loop of one node: which step is protected, which to encode next (docs/ARCHITECTURE.md §5.4).

Each node coordinates one rotation per step (the one whose first parity node it is; the encoding
itself is ftd.daemon.encoder). A step is *protected* once every rotation's parity nodes report
their parity in their heartbeat inventory, so every rotation must encode the same step: one
member, the *announcer* (the lowest-numbered member that is up and not rebuilding), names a
target, the newest step any member sealed; every member pins its first held step at or above it
(its *candidate*), and once every inventory shows the same target and candidate, every node
encodes its rotation of that step. When the target is protected the announcer names the next one;
when candidates differ (a member had already evicted the target) it names a newer one, aiming
further ahead each time; when nothing moves for a peer timeout it names it again. Changes to the
target, a candidate or parity wake the heartbeat (`PeerTable.nudge`), and peers' inventories wake
this loop, so one round takes about one encode plus a few round trips.

The newest protected step and the step being encoded stay pinned in the store (pin owner
"protection"), so eviction never breaks a protected step; so do the steps other groups protect
or encode (see ftd.daemon.peers), so one step stays restorable on every rank of the job
whichever group loses a node. A node that starts empty first tries to
rebuild its memory from the group (ftd.daemon.rebuild).

Threads: the loop runs on `ftd-protect` and is the only writer of the protection state
(protected step, rebuilding, step being encoded, last encoded); the heartbeat, peer-RPC, bulk
and snapshot-RPC threads read it through `view()` and `inventory()`, under the lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ftd import knobs
from ftd._proto import peer_pb2 as pb
from ftd.daemon.encoder import Encoder
from ftd.daemon.groups import Group, rotations
from ftd.daemon.parity import ParityStore, RotationRecord
from ftd.daemon.peers import PeerTable
from ftd.daemon.rebuild import Rebuilder, RebuildInputs
from ftd.daemon.serving import BulkService
from ftd.daemon.store import SegmentStore
from ftd.errors import FtdError
from ftd.metrics import DaemonMetrics

log = logging.getLogger(__name__)

PIN_OWNER = "protection"
MAX_LEAD = 8
"""At most this many steps ahead of the newest seal the announcer aims (steps faster than heartbeats)."""
LEAD_PROBE_EVERY = 8
"""After this many targets protected in a row the announcer aims one step closer again."""


def parity_steps_to_keep(protected: int, on_disk: set[int]) -> set[int]:
    """The protected step and the few newest steps above it.

    Steps above it are kept whether or not any inventory mentions them yet: a rotation record can
    arrive before its coordinator's next heartbeat, and dropping it then leaves that rotation
    without a record on every other node once the step becomes protected.
    """
    return {protected, *sorted(s for s in on_disk if s > protected)[-knobs.get().unprotected_kept:]}


@dataclass(frozen=True)
class ProtectionView:
    """A consistent reading of the protection state."""

    protected_step: int
    rebuilding: bool
    encoding_step: int | None
    target_step: int = -1
    candidate_step: int = -1


class Protector:
    """The protection loop (thread `ftd-protect`) and the state it owns."""

    def __init__(self, me: int, group: Group, job: str, incarnation: int, store: SegmentStore, parity: ParityStore,
                 table: PeerTable, service: BulkService, encoder: Encoder, rebuild: RebuildInputs,
                 metrics: DaemonMetrics, *, other_groups_steps: Callable[[], set[int]]):
        self.me, self.group, self.job, self.incarnation = me, group, job, incarnation
        self.position = group.position(me)
        self.store, self.parity, self.table, self.service = store, parity, table, service
        self.encoder, self._rebuild_inputs, self.metrics = encoder, rebuild, metrics
        self._other_groups_steps = other_groups_steps
        self.ready = threading.Event()
        self._lock = threading.Lock()
        self._protected = max(sorted(parity.whole_steps(group.size)), default=-1)
        self._rebuilding = store.is_empty()  # until the rebuild check has run, an empty node holds nothing
        self._encoding: int | None = None
        self._last_encoded = -1
        self._target = -1      # the group's next step to protect, as this node follows it
        self._candidate = -1   # this node's first held step >= the target (pinned)
        self._announced_at = 0.0  # announcer only: when it named its target (monotonic)
        self._lead = 0            # announcer only: steps ahead of the newest seal it aims
        self._agreed_in_a_row = 0  # announcer only: targets protected since the last mismatch
        self._outside_pins: set[int] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ftd-protect", daemon=True)

    # ---- state, read from any thread ----------------------------------------------------------

    def view(self) -> ProtectionView:
        with self._lock:
            return ProtectionView(self._protected, self._rebuilding, self._encoding, self._target, self._candidate)

    @property
    def protected_step(self) -> int:
        return self.view().protected_step

    @property
    def rebuilding(self) -> bool:
        return self.view().rebuilding

    def _set(self, **changes: object) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self, "_" + name, value)

    def complete_steps(self) -> list[int]:
        """Steps whose data every local rank holds (none until the rebuild check has run)."""
        return sorted(self.store.complete_steps()) if self.ready.is_set() else []

    def inventory(self) -> pb.Inventory:
        """This node's inventory, as heartbeats carry it."""
        state = self.view()
        held = set(self.complete_steps())
        if self.ready.is_set() and state.protected_step >= 0 and self.store.blob_parts(state.protected_step):
            held.add(state.protected_step)  # servable even after the ranks here changed
        steps = []
        for s in sorted(held):
            try:
                steps.append(pb.StepData(step=s, blob_bytes=self.service.blob_size(s)))
            except KeyError:  # evicted since it was listed: not held any more, so not announced
                continue
        parity = [pb.ParityHeld(step=s, rotation=r, j=j, chunk_bytes=n) for s, r, j, n in self.parity.held()]
        ranks = [r.rank for r in self.store.summary()]
        encoding = state.encoding_step
        newest = self.store.newest_sealed_step() if self.ready.is_set() else None
        return pb.Inventory(job=self.job, node=self.me, incarnation=self.incarnation, steps=steps,
                            parity=parity, protected_step=state.protected_step, rebuilding=state.rebuilding,
                            ranks=ranks, encoding_step=-1 if encoding is None else encoding,
                            target_step=state.target_step, candidate_step=state.candidate_step,
                            newest_step=-1 if newest is None else newest)

    def accept_record(self, record: RotationRecord) -> None:
        """Keep a rotation record of this group (from a coordinator, or a rebuild)."""
        if record.members != list(self.group.members):
            raise ValueError(f"record for group {record.members}, this node is in {list(self.group.members)}")
        self.parity.put_record(record)
        if self.position in record.parity:
            j = record.parity.index(self.position)
            if self.parity.seal(record.step, record.rotation, j):
                log.debug("holding parity %d of step %d rotation %d", j, record.step, record.rotation)
                self.table.nudge()  # the announcer learns the step is protected at once

    def notify_sealed(self) -> None:
        """A rank sealed a step: look for a step to encode now rather than at the next pass."""
        self._wake.set()

    # ---- life ---------------------------------------------------------------------------------

    def start(self) -> Protector:
        self._update_pins()  # a restarted daemon keeps the protected step it re-adopted
        self.table.on_seen(self._wake.set)  # a peer's new inventory may settle the target
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- the loop (thread ftd-protect) ----------------------------------------------------------

    def _run(self) -> None:
        try:
            if self.store.is_empty():
                self._set(rebuilding=True)
                rebuilt = Rebuilder(self._rebuild_inputs).run()
                if rebuilt is not None:
                    for record in rebuilt.records:
                        self.accept_record(record)
                    self._set(protected=rebuilt.step)
                    self.metrics.protected_step.set(rebuilt.step)
                    self.metrics.group_protected.set(1)
        except Exception:  # noqa: BLE001 - a failed rebuild must not end protection
            self.metrics.thread_errors.labels("ftd-rebuild").inc()
            self.metrics.rebuilds.labels("failed").inc()
            log.exception("rebuild failed; this node starts protecting what it holds from now on")
        self._set(rebuilding=False)
        self.ready.set()
        last_error = ""
        while not self._stop.is_set():
            self._wake.wait(knobs.get().protect_interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._tick()
                last_error = ""
            except Exception as exc:  # a daemon thread must survive anything a peer sends
                message = f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, FtdError):
                    self.metrics.thread_errors.labels("ftd-protect").inc()
                if message != last_error:  # once per distinct failure, not five times a second
                    log.warning("protection: %s", message, exc_info=not isinstance(exc, FtdError))
                last_error = message

    def _tick(self) -> None:
        self.metrics.parity_held_bytes.set(self.parity.held_bytes())
        if self._other_groups_steps() != self._outside_pins:
            self._update_pins()
        newest = self._follow_timeline()
        invs = self.table.inventories()
        invs[self.me] = self.inventory()
        self._update_protected(invs)
        self._export_lag(newest)
        if len(invs) < self.group.size or any(inv.rebuilding for inv in invs.values()):
            return
        announcer = min(invs, key=self.group.position)
        if announcer == self.me:
            self._announce(invs)
        self._follow(invs[announcer].target_step if announcer != self.me else self._target, newest)
        invs[self.me] = self.inventory()
        state = self.view()
        step = state.candidate_step
        if step < 0 or step <= self._last_encoded or step <= state.protected_step:
            return
        if any(inv.target_step != state.target_step or inv.candidate_step != step
               or not any(s.step == step for s in inv.steps) for inv in invs.values()):
            return  # not agreed yet: a member has not seen the target, or holds another step
        self._set(encoding=step)
        self._update_pins()
        try:
            self.encoder.encode(step, {n: next(s.blob_bytes for s in inv.steps if s.step == step)
                                       for n, inv in invs.items()})
        finally:
            self._set(last_encoded=step, encoding=None)
            self.table.nudge()

    def _announce(self, invs: dict[int, pb.Inventory]) -> None:
        """As the announcer, name the group's next target when there is none, it is protected, the
        members' candidates for it differ, or nothing moved for a peer timeout."""
        newest = max(inv.newest_step for inv in invs.values())
        if newest < 0:
            return
        target, protected, now = self._target, self.protected_step, time.monotonic()
        following = [inv for inv in invs.values() if inv.target_step == target]
        candidates = {inv.candidate_step for inv in following}
        if target < 0:
            reason = "first"
        elif protected >= target:
            reason = "protected"
            self._agreed_in_a_row += 1
            if self._agreed_in_a_row % LEAD_PROBE_EVERY == 0:
                self._lead = max(0, self._lead - 1)  # now and then, try aiming closer
        elif len(following) == len(invs) and -1 not in candidates and len(candidates) > 1:
            reason, self._agreed_in_a_row = "mismatch", 0
            self._lead = min(self._lead + 1, MAX_LEAD)
        elif now - self._announced_at > self.table.peer_timeout and all(inv.encoding_step < 0 for inv in invs.values()):
            reason, self._lead = "stalled", 0  # e.g. training stopped below a target aimed ahead
        else:
            return
        chosen = max(newest + self._lead, protected + 1)
        self._announced_at = now
        if chosen != target:
            log.debug("group %d: next step to protect is %d (%s)", self.group.index, chosen, reason)
            self.metrics.protection_targets.labels(reason).inc()
            self._set(target=chosen, candidate=-1)
            self._update_pins()
            self.table.nudge()

    def _follow(self, target: int, newest: int | None) -> None:
        """Take the announcer's target; pin this node's candidate for it: its first held step at or
        above the target (not above its newest seal: higher numbers are an older timeline's)."""
        state = self.view()
        if target != state.target_step:
            self._set(target=target, candidate=-1)
            self._update_pins()
            state = self.view()
        if target < 0 or newest is None:
            return
        held = [s for s in self.complete_steps() if target <= s <= newest]
        if state.candidate_step >= 0 and state.candidate_step in held:
            return
        candidate = min(held, default=-1)
        if candidate != state.candidate_step:
            self._set(candidate=candidate)
            self._update_pins()
            self.table.nudge()

    def _export_lag(self, newest: int | None) -> None:
        """ftd_protection_lag_steps / _seconds: how far the protected step trails the newest seal."""
        protected = self.protected_step
        if newest is None or protected < 0:
            self.metrics.protection_lag_steps.set(-1)
            self.metrics.protection_lag_seconds.set(-1)
            return
        self.metrics.protection_lag_steps.set(max(0, newest - protected))
        t_newest, t_protected = self.store.sealed_at(newest), self.store.sealed_at(protected)
        if t_newest is not None and t_protected is not None:
            self.metrics.protection_lag_seconds.set(max(0.0, t_newest - t_protected))

    def _follow_timeline(self) -> int | None:
        """Notice training going back below the protected step; return the newest sealed step.

        A restore to an older step (or a fresh start when nothing was usable) begins a new timeline:
        its steps are numbered below the protected one yet are the newer state. The old timeline's
        protection is dropped and the new steps are protected from then on; steps numbered above
        the newest seal are never encoded again.
        """
        newest = self.store.newest_sealed_step()
        state = self.view()
        if newest is None or state.protected_step < 0 or newest >= state.protected_step or state.rebuilding:
            return newest
        log.warning("training went back to step %d, below the protected step %d (a restore to an older step or "
                    "a fresh start): protecting the new timeline from now on", newest, state.protected_step)
        self._set(protected=-1, last_encoded=-1, target=-1, candidate=-1)
        self.metrics.protected_step.set(-1)
        self.metrics.group_protected.set(0)
        self.parity.drop_except({s for s in self.parity.steps() if s <= newest})
        self._update_pins()
        return newest

    def _update_protected(self, invs: dict[int, pb.Inventory]) -> None:
        g = self.group
        held = {n: {(p.step, p.rotation, p.j) for p in inv.parity} for n, inv in invs.items()}
        steps = set.union(set(), *({p.step for p in inv.parity} for inv in invs.values()))
        before = protected = self.protected_step
        for step in sorted(steps):
            if step <= protected:
                continue
            if all((step, rot.r, j) in held.get(g.members[pos], set())
                   for rot in rotations(g.size, g.m) for j, pos in enumerate(rot.parity)):
                protected = step
        if protected != before:
            log.info("group %d: step %d is protected", g.index, protected)
            sealed = self.store.sealed_at(protected)
            if sealed is not None:
                self.metrics.seal_to_protected.observe(max(0.0, time.time() - sealed))
            self._set(protected=protected)
            self.metrics.protected_step.set(protected)
            self.metrics.group_protected.set(1)
            self._update_pins()
            self.parity.drop_except(parity_steps_to_keep(protected, self.parity.steps()))

    def _update_pins(self) -> None:
        self._outside_pins = self._other_groups_steps()
        state = self.view()
        pins = {state.protected_step, state.candidate_step, *self._outside_pins}
        if state.encoding_step is not None:
            pins.add(state.encoding_step)
        pins = {p for p in pins if p >= 0}
        self.store.pin(pins, owner=PIN_OWNER)
        self.service.release_blobs(pins)
