"""Protection lag under fast steps: protected step against the newest sealed step, over time.

    python bench/lag_bench.py [--nodes 3] [--ec 2+1] [--mib 4] [--period 0.03] [--seconds 30]

A thin wrapper: everything lives in ftd/bench/lag.py. Results go to bench/results/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ftd.bench.lag import main  # noqa: E402

if __name__ == "__main__":
    if not any(a == "--out-dir" or a.startswith("--out-dir=") for a in sys.argv[1:]):
        sys.argv[1:1] = ["--out-dir", str(Path(__file__).resolve().parent / "results")]
    sys.exit(main())
