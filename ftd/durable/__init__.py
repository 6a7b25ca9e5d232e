"""The durable tier: steps the daemons write from shared memory to a directory, as a checkpoint that
stock `torch.distributed.checkpoint.load` reads onto any world size (docs/ARCHITECTURE.md §12).

- `ftd.durable.layout`: where everything lies, and the JSON documents (rank sidecar, index, commit marker);
- `ftd.durable.safetensors`: the safetensors header ftd writes and reads back without the safetensors package;
- `ftd.durable.writer`: writing one rank's files straight from its segment, committing a step, retention;
- `ftd.durable.reader`: committed steps, verified, and a rank's segment rebuilt from them.
"""
