"""Keep a resumed DistributedDataParallel model's gradient buckets as they were at the snapshot.

DDP starts with its parameters bucketed in reverse order and rebuilds the buckets once, before the
second iteration, in the order gradients became ready in the first. The all-reduce sums each element
in an order that depends on where it sits in its bucket (the ring cuts the flattened bucket into
chunks), so a fresh DDP after a restore, reducing its first iteration in the initial buckets, would
drift from the uninterrupted run in the last bits from 3 ranks on.

So the snapshot records DDP's current buckets as indices into its parameter list (meta
"ddp_buckets"), and restore() rebuilds a DDP still holding its initial buckets with exactly those,
the way DDP itself rebuilds its reducer when unpickled. A snapshot taken after the first iteration,
before DDP's own rebuild, first triggers that rebuild (the one the next forward would do; every
rank calls snapshot() at the same step). Anything unexpected in torch's internals logs one warning
and leaves DDP as it was: training never fails for it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

META_KEY = "ddp_buckets"
_warned = False


def find(model: torch.nn.Module, ddp: torch.nn.Module | None) -> torch.nn.parallel.DistributedDataParallel | None:
    """The DistributedDataParallel wrapper: `ddp` when given, else `model` when it is one."""
    if ddp is not None and not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"ddp= must be a torch.nn.parallel.DistributedDataParallel, got {type(ddp).__name__}")
    candidate = ddp if ddp is not None else model
    return candidate if isinstance(candidate, torch.nn.parallel.DistributedDataParallel) else None


def _warn_once(what: str, exc: BaseException | None = None) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("DDP's gradient buckets are not kept across restores (%s%s): a resumed run may differ from "
                    "an uninterrupted one in the last bits", what, f": {type(exc).__name__}: {exc}" if exc else "")


def _unsupported(ddp: Any) -> str | None:
    """Why the buckets of `ddp` cannot be kept, or None."""
    if ddp.static_graph:
        return "static_graph=True"
    if getattr(ddp, "_use_python_reducer", False):
        return "the Python reducer (compiled autograd) is in use"
    if ddp.mixed_precision is not None:
        return "DDP mixed precision is set"
    if getattr(ddp, "_comm_hooks", None):
        return "a communication hook is registered"
    return None


class BucketKeeper:
    """Reads the buckets of one DDP module at snapshot time and puts recorded ones back on restore."""

    def __init__(self, ddp: torch.nn.parallel.DistributedDataParallel) -> None:
        self.ddp = ddp
        self._buckets: list[list[int]] | None = None  # cached: DDP rebuilds its buckets once

    def buckets(self) -> list[list[int]] | None:
        """DDP's rebuilt buckets as parameter indices (None while it holds its initial ones or on error).

        Call on every rank at the same step, on the training thread: after the first backward this
        performs DDP's one bucket rebuild, a collective, instead of the next forward doing it.
        """
        if self._buckets is not None:
            return self._buckets
        ddp = self.ddp
        try:
            if (why := _unsupported(ddp)) is not None:
                _warn_once(why)
                return None
            if not ddp._has_rebuilt_buckets:
                if not torch.is_grad_enabled() or not ddp.reducer._rebuild_buckets():
                    return None  # no backward yet (or find_unused_parameters: DDP never rebuilds)
                ddp._has_rebuilt_buckets = True
            parameters, _ = ddp._build_params_for_reducer()
            index = {id(p): i for i, p in enumerate(parameters)}
            self._buckets = [[index.get(id(p), -1) for p in bucket.parameters()]
                             for bucket in ddp.reducer._get_zeros_like_grad_buckets()]
            if any(i < 0 for b in self._buckets for i in b):
                self._buckets = None
                _warn_once("a bucket holds a parameter DDP does not list")
            return self._buckets
        except Exception as exc:  # noqa: BLE001 - torch internals: never fail a snapshot for them
            _warn_once("cannot read the buckets", exc)
            return None

    def apply(self, recorded: Any) -> bool:
        """Rebuild the reducer with the `recorded` buckets if DDP still holds its initial ones. Never raises."""
        ddp = self.ddp
        try:
            if ddp._has_rebuilt_buckets or recorded is None:
                return False
            if (why := _unsupported(ddp)) is not None:
                _warn_once(why)
                return False
            parameters, sparse = ddp._build_params_for_reducer()
            if (not isinstance(recorded, list) or not recorded
                    or not all(isinstance(b, list) and all(type(i) is int for i in b) for b in recorded)
                    or sorted(i for b in recorded for i in b) != list(range(len(parameters)))):
                _warn_once(f"the recorded buckets do not cover the model's {len(parameters)} parameters once")
                return False
            indices = [list(b) for b in recorded]
            limits = [ddp._bucket_config.first_bucket_bytes_cap] + [ddp.bucket_bytes_cap] * (len(indices) - 1)
            original = dist._compute_bucket_assignment_by_size  # what DDP's _ddp_init_helper calls

            def recorded_assignment(*_: Any, **__: Any) -> tuple[list[list[int]], list[int]]:
                return list(reversed(indices)), list(reversed(limits))  # _ddp_init_helper reverses them again

            dist._compute_bucket_assignment_by_size = recorded_assignment
            try:
                ddp._ddp_init_helper(parameters, sparse, ddp._build_debug_param_to_name_mapping(parameters),
                                     ddp.static_graph)
            finally:
                dist._compute_bucket_assignment_by_size = original
            ddp._has_rebuilt_buckets = True
            self._buckets = indices
            log.debug("DDP's reducer rebuilt with the %d recorded gradient buckets", len(indices))
            return True
        except Exception as exc:  # noqa: BLE001 - torch internals: never fail a restore for them
            _warn_once("cannot rebuild the reducer", exc)
            return False
