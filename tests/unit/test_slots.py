"""ftd.daemon.slots: the segment state machine, every edge it has and every edge it lacks; Source."""

from __future__ import annotations

import itertools

import pytest

from ftd.daemon.slots import IllegalTransition, Slot, SlotState, Source
from ftd.errors import FtdError

NEW, PREFAULTING = SlotState.NEW, SlotState.PREFAULTING
FREE, WRITING, SEALED = SlotState.FREE, SlotState.WRITING, SlotState.SEALED
ALLOWED = {(NEW, PREFAULTING), (PREFAULTING, FREE), (NEW, WRITING),
           (FREE, WRITING), (WRITING, SEALED), (WRITING, FREE), (SEALED, FREE)}


def _slot(tmp_path, state: SlotState) -> Slot:
    """A slot brought into `state` through the public methods only."""
    if state in (NEW, PREFAULTING):
        slot = Slot(tmp_path / "0123.seg", 1 << 20, state=NEW)
        if state is PREFAULTING:
            slot.prefault()
    else:
        slot = Slot(tmp_path / "0123.seg", 1 << 20)
    if state in (WRITING, SEALED):
        slot.begin(5, 77, 1.0)
    if state is SEALED:
        slot.seal(b'{"m": 1}', 1000, Source.REBUILT)
    assert slot.state is state
    return slot


def _fields(slot: Slot) -> tuple:
    return slot.state, slot.step, slot.lease, slot.manifest_json, slot.begun_at, slot.sealed_at_ns, slot.source


# ---- the edges, through the public methods ----------------------------------------------------


def test_free_begin_writing(tmp_path):
    slot = _slot(tmp_path, FREE)
    assert (slot.step, slot.lease, slot.manifest_json) == (None, None, None)
    slot.begin(3, 42, 12.5)
    assert (slot.state, slot.step, slot.lease, slot.begun_at) == (WRITING, 3, 42, 12.5)


def test_writing_seal_sealed(tmp_path):
    slot = _slot(tmp_path, WRITING)
    slot.seal(b"manifest", 2000)
    assert (slot.state, slot.step, slot.lease, slot.manifest_json) == (SEALED, 5, None, b"manifest")
    assert slot.sealed_at_ns == 2000


def test_writing_release_free(tmp_path):
    slot = _slot(tmp_path, WRITING)
    slot.release()
    assert (slot.state, slot.step, slot.lease, slot.manifest_json) == (FREE, None, None, None)


def test_sealed_release_free(tmp_path):
    slot = _slot(tmp_path, SEALED)
    slot.release()
    assert (slot.state, slot.step, slot.lease, slot.manifest_json) == (FREE, None, None, None)
    assert slot.sealed_at_ns == 0


def test_new_prefault_prefaulted_free(tmp_path):
    slot = _slot(tmp_path, NEW)
    slot.prefault()
    assert slot.state is PREFAULTING
    slot.prefaulted()
    assert (slot.state, slot.step, slot.lease) == (FREE, None, None)
    slot.begin(1, 9, 2.0)
    assert (slot.state, slot.step, slot.lease) == (WRITING, 1, 9)


def test_new_begin_writing(tmp_path):
    """install_sealed takes a never-touched segment: its copy touches the pages."""
    slot = _slot(tmp_path, NEW)
    slot.begin(4, 0, 7.0)
    assert (slot.state, slot.step, slot.lease, slot.begun_at) == (WRITING, 4, 0, 7.0)


def test_seal_carries_the_source_and_release_forgets_it(tmp_path):
    slot = _slot(tmp_path, WRITING)
    slot.seal(b"m", 1, Source.FETCHED)
    assert slot.source is Source.FETCHED
    slot.release()
    assert slot.source is Source.LOCAL
    slot.begin(6, 1, 0.0)
    slot.seal(b"m", 2)
    assert slot.source is Source.LOCAL, "a Commit seals LOCAL unless told otherwise"


def test_adopt_sealed_takes_the_source(tmp_path):
    slot = _slot(tmp_path, FREE)
    slot.adopt_sealed(3, b"m", 5, Source.REBUILT)
    assert (slot.state, slot.source) == (SEALED, Source.REBUILT)


def test_full_cycle_repeats(tmp_path):
    slot = _slot(tmp_path, FREE)
    for step in range(3):
        slot.begin(step, step + 100, float(step))
        slot.seal(b"m%d" % step, step + 1)
        assert slot.step == step and slot.manifest_json == b"m%d" % step
        slot.release()
    assert slot.state is FREE


def test_adopt_sealed_from_free(tmp_path):
    slot = _slot(tmp_path, FREE)
    slot.adopt_sealed(9, b"adopted", 3000)
    assert (slot.state, slot.step, slot.lease, slot.manifest_json) == (SEALED, 9, None, b"adopted")
    assert slot.sealed_at_ns == 3000


@pytest.mark.parametrize("state", [PREFAULTING, WRITING, SEALED])
def test_adopt_sealed_only_from_free(tmp_path, state):
    slot = _slot(tmp_path, state)
    before = _fields(slot)
    with pytest.raises(IllegalTransition):
        slot.adopt_sealed(9, b"adopted", 3000)
    assert _fields(slot) == before


# ---- the missing edges ------------------------------------------------------------------------


@pytest.mark.parametrize("state,call", [
    (WRITING, "begin"), (SEALED, "begin"),   # only a free (or never-touched) slot can be handed out
    (PREFAULTING, "begin"),                  # nor one whose pages are being touched by someone else
    (FREE, "seal"), (SEALED, "seal"),        # only a slot being written can be sealed
    (NEW, "seal"), (PREFAULTING, "seal"),
    (FREE, "release"),                       # nothing to release
    (NEW, "release"), (PREFAULTING, "release"),  # a prefault in flight is not released from under it
    (FREE, "prefault"), (PREFAULTING, "prefault"), (WRITING, "prefault"), (SEALED, "prefault"),
    (NEW, "prefaulted"), (FREE, "prefaulted"),   # prefaulted() ends a prefault, nothing else
    (WRITING, "prefaulted"), (SEALED, "prefaulted"),
])
def test_illegal_calls_raise_and_change_nothing(tmp_path, state, call):
    slot = _slot(tmp_path, state)
    before = _fields(slot)
    args = {"begin": (8, 99, 3.0), "seal": (b"other", 4000), "release": (), "prefault": (),
            "prefaulted": ()}[call]
    with pytest.raises(IllegalTransition) as err:
        getattr(slot, call)(*args)
    assert _fields(slot) == before
    assert "0123.seg" in str(err.value)
    assert state.value in str(err.value)


@pytest.mark.parametrize("src,dst", list(itertools.product(SlotState, SlotState)))
def test_every_pair_of_states(tmp_path, src, dst):
    slot = _slot(tmp_path, src)
    if (src, dst) in ALLOWED:
        slot._move(dst)
        assert slot.state is dst
    else:
        with pytest.raises(IllegalTransition, match=f"{src.value} -> {dst.value}"):
            slot._move(dst)
        assert slot.state is src


def test_exactly_seven_edges():
    from ftd.daemon import slots

    assert slots._ALLOWED == ALLOWED


def test_illegal_transition_is_an_ftd_error():
    assert issubclass(IllegalTransition, FtdError)


def test_manifest_path_is_beside_the_segment(tmp_path):
    slot = Slot(tmp_path / "rank-0" / "abcd.seg", 4096)
    assert slot.manifest_path == tmp_path / "rank-0" / "abcd.manifest.json"


def test_source_file_beside_the_segment(tmp_path):
    slot = Slot(tmp_path / "rank-0" / "abcd.seg", 4096)
    assert slot.source_path == tmp_path / "rank-0" / "abcd.source"


@pytest.mark.parametrize("source,wire,in_blob", [
    (Source.LOCAL, "local", True), (Source.REBUILT, "peers", True), (Source.FETCHED, "peers", False)])
def test_source_values(source, wire, in_blob):
    assert (source.recovery_source, source.in_node_blob) == (wire, in_blob)
    assert Source(source.value) is source


def test_source_wire_values_are_exactly_five():
    assert [s.value for s in Source] == ["local", "rebuilt", "fetched", "durable", "adopted"]
    assert [s for s in Source if s.in_node_blob] == [Source.LOCAL, Source.REBUILT]
