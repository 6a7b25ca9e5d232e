"""The first snapshot of a fresh process against the steady state, and the memory a rank holds while saving.

    flock /tmp/ftd-bench.lock python bench/memory_bench.py [--gib 1] [--snapshots 6] [--compute-s 0.4]

A thin wrapper: everything lives in ftd/bench/memory.py. Results go to bench/results/memory-<date>.json.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ftd.bench.memory import main  # noqa: E402

if __name__ == "__main__":
    if not any(a == "--out-dir" or a.startswith("--out-dir=") for a in sys.argv[1:]):
        sys.argv[1:1] = ["--out-dir", str(Path(__file__).resolve().parent / "results")]
    sys.exit(main())
