"""The checkpointing methods under comparison, behind one small interface.

`save(step)` returns when control goes back to the training loop (a handle for asynchronous
methods); `wait(handle)` returns when that save is complete (file written, fsynced for the disk
variant; future resolved; ftd segment sealed). `restore_spec()` tells ftd.bench.restore_child how
to restore the newest save into a fresh process.
"""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftd.bench.common import nbytes_of, path_bytes, remove_path, state_tensors, sync_device

ALIGN = 64

# key -> (label, kind); kind: sync | async | ftd | reference
METHODS: dict[str, tuple[str, str]] = {
    "torch_save_shm": ("torch.save -> /dev/shm", "sync"),
    "torch_save_disk": ("torch.save -> disk (+fsync)", "sync"),
    "dcp_save": ("dcp.save -> /dev/shm", "sync"),
    "dcp_async_thread": ("dcp.async_save thread -> /dev/shm", "async"),
    "dcp_async_process": ("dcp.async_save process -> /dev/shm", "async"),
    "torchsnapshot": ("torchsnapshot async_take -> /dev/shm", "async"),
    "ftd": ("ftd Snapshotter -> daemon shm", "ftd"),
    "memcpy": ("memcpy into touched buffer (reference)", "reference"),
}
FAST_METHODS = ["torch_save_shm", "dcp_save", "dcp_async_thread", "ftd", "memcpy"]


def ensure_process_group() -> None:
    """A single-process gloo group, which torch.distributed.checkpoint wants."""
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def availability(key: str) -> str | None:
    """None when the method can run here, else 'not available: <reason>'."""
    try:
        if key.startswith("dcp"):
            import torch.distributed.checkpoint  # noqa: F401
            if key == "dcp_async_process":
                from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
                if not hasattr(AsyncCheckpointerType, "PROCESS"):
                    return f"not available: torch {torch.__version__} has no AsyncCheckpointerType.PROCESS"
        elif key == "torchsnapshot":
            import torchsnapshot  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason
        return f"not available: {type(exc).__name__}: {exc}"
    return None


class Method:
    kind = "sync"

    def __init__(self, key: str, model: nn.Module, opt: torch.optim.Optimizer, workdir: Path, device: str):
        self.key, self.model, self.opt, self.workdir, self.device = key, model, opt, workdir, device
        self.label = METHODS[key][0]
        self.kind = METHODS[key][1]
        self.paths: deque[Path] = deque()
        workdir.mkdir(parents=True, exist_ok=True)

    # paths: a fresh one per save; older ones are removed once a newer save is complete
    def next_path(self, step: int) -> Path:
        path = self.workdir / f"{self.key}-{step}"
        remove_path(path)
        self.paths.append(path)
        return path

    def retire(self) -> None:
        while len(self.paths) > 1:
            remove_path(self.paths.popleft())

    def save(self, step: int) -> Any:
        raise NotImplementedError

    def wait(self, handle: Any) -> None:
        self.retire()

    def bytes_written(self) -> int:
        return path_bytes(self.paths[-1]) if self.paths else 0

    def restore_spec(self) -> dict[str, Any]:
        return {"method": self.key, "path": str(self.paths[-1])}

    def close(self) -> None:
        for p in self.paths:
            remove_path(p)
        self.paths.clear()


class TorchSave(Method):
    def save(self, step: int) -> Any:
        path = self.next_path(step)
        torch.save({"model": self.model.state_dict(), "optim": self.opt.state_dict()}, path)
        return path

    def wait(self, handle: Any) -> None:
        if self.key == "torch_save_disk":  # durable: on the disk, not only in the page cache
            fd = os.open(handle, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.retire()


class Dcp(Method):
    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        ensure_process_group()
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.dcp, self.get_state_dict = dcp, get_state_dict

    def state_dict(self) -> dict[str, Any]:
        msd, osd = self.get_state_dict(self.model, self.opt)
        return {"model": msd, "optim": osd}

    def save(self, step: int) -> Any:
        path = self.next_path(step)
        if self.key == "dcp_save":
            self.dcp.save(self.state_dict(), checkpoint_id=str(path))
            return None
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        typ = AsyncCheckpointerType.PROCESS if self.key == "dcp_async_process" else AsyncCheckpointerType.THREAD
        fut = self.dcp.async_save(self.state_dict(), checkpoint_id=str(path), async_checkpointer_type=typ)
        return getattr(fut, "upload_completion", fut)  # AsyncSaveResponse (with an async stager) or Future

    def wait(self, handle: Any) -> None:
        if handle is not None:
            handle.result()
        self.retire()

    def close(self) -> None:
        super().close()
        if self.key == "dcp_async_process":
            stop_dcp_process()


class TorchSnapshot(Method):
    def save(self, step: int) -> Any:
        import torchsnapshot

        path = self.next_path(step)
        return torchsnapshot.Snapshot.async_take(path=str(path), app_state={"model": self.model, "optim": self.opt})

    def wait(self, handle: Any) -> None:
        handle.wait()
        self.retire()


class Ftd(Method):
    def __init__(self, *a: Any, env: dict[str, str], **kw: Any):
        super().__init__(*a, **kw)
        import ftd

        self.env = env
        self.snap = ftd.Snapshotter(self.model, self.opt, job=env["FTD_JOB"], socket=env["FTD_SOCKET"], rank=0,
                                    world_size=1)

    def save(self, step: int) -> Any:
        self.snap.snapshot(step)
        return step

    def wait(self, handle: Any) -> None:
        self.snap.wait()
        if self.snap.stats.last_sealed_step != handle:
            raise RuntimeError(f"ftd snapshot of step {handle} was not sealed: {dict(self.snap.stats.skip_reasons)}")

    def bytes_written(self) -> int:
        return self.snap.stats.last_bytes

    def restore_spec(self) -> dict[str, Any]:
        return {"method": self.key, "job": self.env["FTD_JOB"], "socket": self.env["FTD_SOCKET"]}

    def close(self) -> None:
        self.snap.close(timeout=30)


class Memcpy(Method):
    """The physical reference: `Tensor.copy_` of the same tensors into one already-touched buffer
    (64-byte aligned slots, like ftd's segment layout); pinned host memory for CUDA state."""

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        tensors = state_tensors(self.model, self.opt)
        offsets, total = [], 0
        for t in tensors:
            offsets.append(total)
            total += -(-(t.numel() * t.element_size()) // ALIGN) * ALIGN
        pin = self.device.startswith("cuda")
        self.dst = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
        self.dst.fill_(1)  # first touch here, not in the timed copies
        self.pairs = [(self.dst[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape), t)
                      for o, t in zip(offsets, tensors)]
        self.nbytes = nbytes_of(tensors)

    def save(self, step: int) -> Any:
        for dst, src in self.pairs:
            dst.copy_(src, non_blocking=True)
        sync_device(self.device)
        return None

    def restore_once(self) -> float:
        t0 = time.perf_counter()
        for dst, src in self.pairs:
            src.copy_(dst, non_blocking=True)
        sync_device(self.device)
        return time.perf_counter() - t0

    def bytes_written(self) -> int:
        return self.nbytes

    def restore_spec(self) -> dict[str, Any]:
        return {"method": self.key}

    def close(self) -> None:
        self.pairs, self.dst = [], torch.empty(0)


def make_method(key: str, model: nn.Module, opt: torch.optim.Optimizer, ws_shm: Path, ws_disk: Path, device: str,
                env: dict[str, str] | None = None) -> Method:
    base = ws_disk if key == "torch_save_disk" else ws_shm
    if key.startswith("torch_save"):
        return TorchSave(key, model, opt, base / key, device)
    if key.startswith("dcp"):
        return Dcp(key, model, opt, base / key, device)
    if key == "torchsnapshot":
        return TorchSnapshot(key, model, opt, base / key, device)
    if key == "ftd":
        assert env is not None
        return Ftd(key, model, opt, base / key, device, env=env)
    if key == "memcpy":
        return Memcpy(key, model, opt, base / key, device)
    raise ValueError(f"unknown method {key!r}; known: {', '.join(METHODS)}")


def stop_dcp_process() -> None:
    """Stop dcp's checkpoint background process (it would stay for the life of this process)."""
    try:
        from torch.distributed.checkpoint import _async_process_executor as ape

        proc = getattr(ape, "_CHECKPOINT_PROCESS", None)
        if proc is not None:
            proc.__del__()
            ape._CHECKPOINT_PROCESS = None
    except Exception:  # noqa: BLE001 - best effort; it is a daemonic child and dies with us
        pass
