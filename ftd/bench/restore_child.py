"""Restore one method's newest save into a fresh process: `python -m ftd.bench.restore_child SPEC_JSON`.

Builds the same model (random values) and a fresh AdamW without state, then restores `repeats`
times, timing only the restores (the first one also allocates the optimizer state). Prints one
JSON line: {"restore_s": [...], "peak_rss": bytes, "startup_s": seconds before the first restore}.
"""

from __future__ import annotations

import json
import resource
import sys
import time

T_START = time.perf_counter()
CLOSE: list = []

import torch  # noqa: E402

from ftd.bench.common import build_model, build_optimizer, sync_device  # noqa: E402


def restore_fn(spec: dict, model: torch.nn.Module, opt: torch.optim.Optimizer):  # noqa: ANN201
    method, path, device = spec["method"], spec.get("path"), spec["device"]
    if method.startswith("torch_save"):
        def fn() -> None:
            sd = torch.load(path, weights_only=True, map_location=device)
            model.load_state_dict(sd["model"])
            opt.load_state_dict(sd["optim"])
        return fn
    if method.startswith("dcp"):
        from ftd.bench.methods import ensure_process_group
        ensure_process_group()
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        def fn() -> None:
            msd, osd = get_state_dict(model, opt)
            sd = {"model": msd, "optim": osd}
            dcp.load(sd, checkpoint_id=path)
            set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        return fn
    if method == "torchsnapshot":
        import torchsnapshot

        def fn() -> None:
            torchsnapshot.Snapshot(path=path).restore(app_state={"model": model, "optim": opt})
        return fn
    if method == "ftd":
        import ftd
        snap = ftd.Snapshotter(model, opt, job=spec["job"], socket=spec["socket"], rank=0, world_size=1)

        CLOSE.append(snap)

        def fn() -> None:
            if snap.restore() == 0:
                raise RuntimeError("ftd restore found nothing to restore")
        return fn
    raise ValueError(f"no restore for {method!r}")


def main() -> int:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    model = build_model(spec["nbytes"], spec["layers"], spec["device"])
    opt = build_optimizer(model, materialize=False)
    fn = restore_fn(spec, model, opt)
    startup = time.perf_counter() - T_START
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        fn()
        sync_device(spec["device"])
        times.append(time.perf_counter() - t0)
    for snap in CLOSE:
        snap.close(timeout=10)
    n_state = sum(len(s) for s in opt.state.values())
    print(json.dumps({"restore_s": times, "startup_s": startup, "optim_state_entries": n_state,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)
    return 0 if n_state > 0 else 2


if __name__ == "__main__":
    sys.exit(main())
