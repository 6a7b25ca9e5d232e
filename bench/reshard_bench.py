"""Resharding onto fewer nodes from the daemons' memory against the durable tier, the same step, one run.

    python bench/reshard_bench.py [--dim 512] [--layers 4] [--ddp] [--every 4]

A thin wrapper: everything lives in ftd/bench/reshard.py. Results go to bench/results/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ftd.bench.reshard import main  # noqa: E402

if __name__ == "__main__":
    if not any(a == "--out-dir" or a.startswith("--out-dir=") for a in sys.argv[1:]):
        sys.argv[1:1] = ["--out-dir", str(Path(__file__).resolve().parent / "results")]
    sys.exit(main())
