"""What both integrations share: finding the step a restore will load before the optimizer exists.

A framework's trainer fixes where its loop starts (epoch, batch) before it builds the optimizer,
while ftd restores into a live optimizer. So an integration first *peeks*: the newest step every
rank holds that verifies against the model, and that step's `extra` (the trainer's position);
it sets the trainer up to start there, and loads that very step once the optimizer exists
(`Snapshotter.restore(steps=[step])`).
"""

from __future__ import annotations

import logging
from typing import Any

from ftd.client import jsonsafe
from ftd.client import restore as restore_mod
from ftd.errors import ConfigError, FtdError

log = logging.getLogger(__name__)


def peek(snap: Any) -> tuple[int, dict[str, Any] | None]:
    """The newest step every rank holds whose snapshot verifies against `snap.model`, and its decoded extra.

    `snap` is an ftd.Snapshotter. Nothing is loaded and no recovery is reported; (0, None) when
    no step is usable. Only the daemons' memory is searched (not the durable tier).
    """
    if snap._engine is None:  # FTD_ENABLED=0
        return 0, None
    failures: list[str] = []
    local = restore_mod._list_held(snap.client, snap.rank, snap.config.restore_timeout, snap.config.daemon_wait,
                                   failures, snap.world_size)
    for step in restore_mod.agree_on_steps(local):
        extra: Any = None
        ok = False
        try:
            opened = restore_mod.open_verified(snap.client, snap.config.job, snap.rank, snap.world_size, step,
                                               snap.model, snap.config.restore_timeout, snap.replicas,
                                               snap.config.run)
            try:
                meta = opened.manifest.meta
                if "extra" in meta:
                    extra = jsonsafe.decode(meta["extra"], lambda name: opened.view(name).clone())
                ok = True
            finally:
                opened.close()
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - FtdError, or anything a hostile manifest provokes
            text = str(exc) if isinstance(exc, FtdError) else f"{type(exc).__name__}: {exc}"
            log.warning("rank %d: step %d is unusable: %s", snap.rank, step, text)
        if restore_mod.all_ranks_agree(ok):
            return step, extra if isinstance(extra, dict) else None
    return 0, None
