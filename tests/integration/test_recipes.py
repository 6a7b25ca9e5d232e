"""The README's loop recipes, each run against a real daemon: a run stopped at a step and a fresh set of
objects resuming it (in this process) must end bit for bit like an uninterrupted run without ftd.

- a nanoGPT-shaped loop: the next batch is fetched before optimizer.step, so it travels in `extra`
  (a callable: the restored values appear in `snap.restored_extra`); gradient accumulation; AMP's
  GradScaler, whose state travels in `extra` too;
- a dict `extra`, restored in place;
- the ordering rule: restore() after a batch was fetched is a ConfigError;
- `ftd.log_to_stderr()` for a script that configures no logging.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ftd
from ftd.demo.bitexact import differing

STEPS, ACCUM, STOP = 8, 2, 5


@pytest.fixture
def ftd_env(node, monkeypatch):
    """This process talks to the node's daemon."""
    for key, value in node.env.items():
        if key.startswith("FTD_"):
            monkeypatch.setenv(key, value)
    return node


def make(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.amp.GradScaler]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(32, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=2)  # its scale moves every 2 steps
    return model, optimizer, scaler


def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """As nanoGPT's get_batch: random positions from the global torch RNG."""
    x = torch.randint(0, 32, (4, 8))
    return x, (x + 1) % 32


def nanogpt_loop(stop: int | None, use_ftd: bool) -> tuple[dict[int, str], dict[str, torch.Tensor]]:
    """Train to STEPS (or stop after `stop`, as a crash would): losses (hex, with the scaler's scale) per step."""
    model, optimizer, scaler = make()
    iter_num = 0
    x = y = None
    snap = None
    if use_ftd:
        # the callable reads the loop's current variables at each snapshot()
        snap = ftd.Snapshotter(model, optimizer, extra=lambda: {"iter_num": iter_num, "x": x, "y": y,
                                                                "scaler": scaler.state_dict()})
        if snap.restore():  # before the first get_batch(): the ordering rule
            saved = snap.restored_extra
            iter_num, x, y = saved["iter_num"], saved["x"], saved["y"]
            scaler.load_state_dict(saved["scaler"])
    if x is None:
        x, y = get_batch()
    losses: dict[int, str] = {}
    while iter_num < (STEPS if stop is None else stop):
        for micro in range(ACCUM):
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()) / ACCUM
            x, y = get_batch()  # prefetch the next batch while this one's backward runs
            scaler.scale(loss).backward()
            losses[iter_num * ACCUM + micro] = f"{loss.item().hex()} {scaler.get_scale()}"
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        if snap:
            snap.snapshot(iter_num)  # after the optimizer step (and x, y of the next step already fetched)
    if snap:
        snap.wait()
        snap.close()
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


def test_prefetching_loop_with_accumulation_and_grad_scaler_resumes_bit_exact(ftd_env):
    want, want_params = nanogpt_loop(None, use_ftd=False)
    first, _ = nanogpt_loop(STOP, use_ftd=True)
    rest, params = nanogpt_loop(None, use_ftd=True)
    assert min(rest) == STOP * ACCUM, sorted(rest)  # the second run resumed after step STOP
    assert {**first, **rest} == want
    assert not differing(params, want_params)


def test_prefetched_batch_left_out_of_extra_is_not_exact(ftd_env):
    """The counter-test: without x, y in `extra` the resumed run fetches a fresh batch and diverges."""
    want, _ = nanogpt_loop(None, use_ftd=False)
    model, optimizer, scaler = make()
    iter_num = 0
    snap = ftd.Snapshotter(model, optimizer, extra=lambda: {"iter_num": iter_num})
    x, y = get_batch()
    for iter_num in range(1, 3):
        for _ in range(ACCUM):
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()) / ACCUM
            x, y = get_batch()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        snap.snapshot(iter_num)
    snap.wait()
    snap.close()
    model, optimizer, scaler = make()
    snap = ftd.Snapshotter(model, optimizer, extra=lambda: {})
    assert snap.restore() == 2
    x, y = get_batch()  # not the batch the uninterrupted run prefetched
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()) / ACCUM
    snap.close()
    assert loss.item().hex() != want[2 * ACCUM].split()[0]


def test_dict_extra_is_restored_in_place(ftd_env):
    model, optimizer, _ = make()
    position = {"epoch": 0, "batch": 0, "seen": torch.zeros(3)}
    snap = ftd.Snapshotter(model, optimizer, extra=position)
    position.update(epoch=2, batch=7, seen=torch.tensor([1.0, 2.0, -0.0]))
    optimizer.step()
    snap.snapshot(9)
    snap.wait()
    snap.close()
    model, optimizer, _ = make()
    position = {"epoch": 0, "batch": 0, "seen": torch.zeros(3)}
    snap = ftd.Snapshotter(model, optimizer, extra=position)
    assert snap.restore() == 9
    snap.close()
    assert (position["epoch"], position["batch"]) == (2, 7)  # the same dict object, updated
    assert position["seen"].numpy().tobytes() == torch.tensor([1.0, 2.0, -0.0]).numpy().tobytes()
    assert snap.restored_extra == position


def test_restore_after_the_first_batch_is_a_config_error(ftd_env):
    model, optimizer, _ = make()
    snap = ftd.Snapshotter(model, optimizer)
    optimizer.step()
    snap.snapshot(3)
    snap.wait()
    snap.close()
    model, optimizer, _ = make()
    snap = ftd.Snapshotter(model, optimizer)
    loader = iter(torch.utils.data.DataLoader(list(range(16)), batch_size=4, shuffle=True))
    next(loader)  # a shuffling DataLoader draws from the torch RNG for its order
    with pytest.raises(ftd.ConfigError, match="before fetching the first batch"):
        snap.restore()
    snap.close()
    # the way out the message names: restore without the RNG, then restore_rng() once the iterator exists
    model, optimizer, _ = make()
    snap = ftd.Snapshotter(model, optimizer)
    next(iter(torch.utils.data.DataLoader(list(range(16)), batch_size=4, shuffle=True)))
    assert snap.restore(restore_rng=False) == 3
    snap.restore_rng()
    snap.close()


def _script_output(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_log_to_stderr_shows_info_lines_a_bare_script_loses():
    code = ("import logging, ftd; log = logging.getLogger('ftd.client.restore');"
            "log.info('record-a'); log.warning('record-b'); {}; log.info('record-c')")
    bare = _script_output(code.format("pass"))
    assert "record-a" not in bare and "record-b" in bare and "record-c" not in bare  # Python's last resort
    shown = _script_output(code.format("ftd.log_to_stderr()"))
    lines = [line for line in shown.splitlines() if "record-c" in line]
    assert len(lines) == 1 and " INFO ftd.client.restore: " in lines[0], shown
    quiet = _script_output(code.format("ftd.log_to_stderr('WARNING')"))
    assert "record-c" not in quiet
