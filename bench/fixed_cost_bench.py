"""The fixed cost of a snapshot every step on a nanoGPT-sized model, against torch.save to /dev/shm, one run.

    python bench/fixed_cost_bench.py [--dim 128] [--layers 2] [--rounds 8] [--block 25]

A thin wrapper: everything lives in ftd/bench/fixed_cost.py. Results go to bench/results/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ftd.bench.fixed_cost import main  # noqa: E402

if __name__ == "__main__":
    if not any(a == "--out-dir" or a.startswith("--out-dir=") for a in sys.argv[1:]):
        sys.argv[1:1] = ["--out-dir", str(Path(__file__).resolve().parent / "results")]
    sys.exit(main())
