"""Training-loop overhead: step time of a small real training loop (an MLP of big nn.Linear layers,
AdamW, random batches) without checkpoints, with ftd snapshots every step, and with torch.save /
dcp.async_save every step and every 10 steps."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftd.bench.common import Workspace, log, running_daemon, summary
from ftd.bench.methods import availability, ensure_process_group

CONFIGS = [("none", None, 0), ("ftd", "ftd", 1), ("torch_save_shm", "torch.save", 1),
           ("torch_save_shm", "torch.save", 10), ("dcp_async_thread", "dcp.async_save", 1),
           ("dcp_async_thread", "dcp.async_save", 10)]


def make_mlp(dim: int, layers: int, device: str) -> nn.Sequential:
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(dim, dim), nn.GELU()]
    return nn.Sequential(*mods, nn.Linear(dim, 1)).to(device)


def run_loop(args: Any, ws: Workspace) -> dict[str, Any]:
    dim, layers, batch, steps = args.loop_dim, args.loop_layers, args.loop_batch, args.loop_steps
    torch.manual_seed(0)
    model = make_mlp(dim, layers, args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, dim, device=args.device)
    y = torch.randn(batch, 1, device=args.device)
    params = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {"model": f"MLP {layers} x Linear({dim},{dim}) + GELU, batch {batch}, AdamW",
                           "params": params, "state_bytes": params * 12, "steps": steps, "configs": []}
    log(f"[loop] {out['model']}: {params / 1e6:.1f}M params, {params * 12 / 2**20:.0f} MiB with AdamW state; "
        f"{steps} timed steps per configuration")
    workdir = ws.shm / "loop"

    def train_step() -> None:
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for key, label, every in CONFIGS:
        if key != "none" and (reason := availability(key)):
            out["configs"].append({"method": key, "label": label, "every": every, "error": reason})
            continue
        name = "no checkpoints" if key == "none" else f"{label} every {'step' if every == 1 else f'{every} steps'}"
        snap = daemon_ctx = None
        pending = None
        saved = 0
        try:
            if key == "ftd":
                import ftd
                daemon_ctx = running_daemon(ws, f"loop-{uuid.uuid4().hex[:8]}")
                env, _ = daemon_ctx.__enter__()
                snap = ftd.Snapshotter(model, opt, job=env["FTD_JOB"], socket=env["FTD_SOCKET"], rank=0, world_size=1)
            if key.startswith("dcp"):
                ensure_process_group()
                import torch.distributed.checkpoint as dcp
                from torch.distributed.checkpoint.state_dict import get_state_dict
            workdir.mkdir(parents=True, exist_ok=True)
            times = []
            for i in range(steps + 3):  # 3 warm-up steps (ftd allocates its segments there)
                t0 = time.perf_counter()
                train_step()
                if key != "none" and (i + 1) % every == 0:
                    if key == "ftd":
                        snap.snapshot(i + 1)
                    elif key == "torch_save_shm":
                        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, workdir / "ckpt.pt")
                    else:
                        if pending is not None:
                            pending.result()
                        shutil.rmtree(workdir / f"dcp-{saved - 2}", ignore_errors=True)
                        msd, osd = get_state_dict(model, opt)
                        pending = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=str(workdir / f"dcp-{saved}"))
                        saved += 1
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            if pending is not None:
                pending.result()
            row = {"method": key, "label": name, "every": every, "step_s": times, "step": summary(times)}
            if snap is not None:
                snap.wait()
                row["ftd_stalls_s"] = list(snap.stats.stalls_s)[-steps:]
                row["ftd_skipped"] = snap.stats.skipped
            out["configs"].append(row)
            log(f"[loop] {name}: median step {row['step']['median'] * 1e3:.1f} ms "
                f"(min {row['step']['min'] * 1e3:.1f}, max {row['step']['max'] * 1e3:.1f})")
        except Exception as exc:  # noqa: BLE001
            log(f"[loop] {name} FAILED: {type(exc).__name__}: {exc}")
            out["configs"].append({"method": key, "label": name, "every": every, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            if snap is not None:
                snap.close(timeout=30)
            if daemon_ctx is not None:
                daemon_ctx.__exit__(None, None, None)
            shutil.rmtree(workdir, ignore_errors=True)
    base = next((c["step"]["median"] for c in out["configs"] if c["method"] == "none" and "step" in c), None)
    for c in out["configs"]:
        if base and "step" in c:
            c["overhead_pct"] = (c["step"]["median"] / base - 1) * 100
    return out


