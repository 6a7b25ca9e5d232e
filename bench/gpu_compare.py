"""The comparison with the training state on a CUDA device, sized to finish in under 5 minutes.

    python bench/gpu_compare.py [extra ftd-bench flags]

Runs `ftd bench --device cuda --sizes 1GiB --repeats 3 --compute-s 0.2 --loop-steps 20
--no-scaling` (the scaling part is host-only and identical to the CPU run) and writes
bench/results/compare-<date>-gpu.{json,md,png}. ftd copies device -> daemon shm on its copy thread;
memcpy is a device -> pinned-host copy; torch.save / dcp / torchsnapshot save CUDA tensors as
they are. On a machine without CUDA it says so and exits 0.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ftd.bench.compare import main  # noqa: E402

DEFAULTS = ["--device", "cuda", "--sizes", "1GiB", "--repeats", "3", "--compute-s", "0.2", "--loop-steps", "20",
            "--no-scaling", "--tag=-gpu", "--out-dir", str(Path(__file__).resolve().parent / "results")]

if __name__ == "__main__":
    if not torch.cuda.is_available():
        print(f"bench/gpu_compare.py: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "run it on a GPU machine. Nothing done.")
        sys.exit(0)
    sys.exit(main(DEFAULTS + sys.argv[1:]))
