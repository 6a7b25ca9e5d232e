"""ftd's durable tier against dcp.async_save (thread and process) in a real training loop, and ftd's
seal -> durable against a raw write + fsync of the same bytes, on one disk directory and one cadence.

    python bench/durable_bench.py [--state-mb 256] [--every 5] [--rounds 24] [--dir DIR]

A thin wrapper: everything lives in ftd/bench/durable.py. Results go to bench/results/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ftd.bench.durable import main  # noqa: E402

if __name__ == "__main__":
    if not any(a == "--out-dir" or a.startswith("--out-dir=") for a in sys.argv[1:]):
        sys.argv[1:1] = ["--out-dir", str(Path(__file__).resolve().parent / "results")]
    sys.exit(main())
