"""Benchmarks that ship with ftd: `ftd bench` compares ftd with torch.save, torch.distributed.checkpoint,
torchsnapshot and a plain memcpy on the same training state (see ftd.bench.compare)."""
