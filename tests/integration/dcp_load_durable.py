"""Load a durable step with stock torch.distributed.checkpoint onto this torchrun world. No ftd import.

    torchrun --nproc-per-node 2 dcp_load_durable.py STEP_DIR OUT

Every global tensor of the checkpoint (from the safetensors headers alone) becomes a DTensor
sharded by rows over the world (replicated when it has fewer rows than ranks), DCP's load planner
reads each rank's rows from whichever files hold them, and rank 0 saves the full tensors to OUT.
"""

import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor


def main() -> None:
    step_dir, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    metadata = dcp.HuggingFaceStorageReader(step_dir).read_metadata()
    state = {}
    for fqn, md in metadata.state_dict_metadata.items():
        empty = torch.zeros(md.size, dtype=md.properties.dtype)
        placement = [Shard(0)] if len(md.size) and md.size[0] >= world else [Replicate()]
        state[fqn] = distribute_tensor(empty, mesh, placement)
    dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(step_dir))
    full = {fqn: t.full_tensor() for fqn, t in state.items()}
    if dist.get_rank() == 0:
        torch.save(full, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
