"""The second-round performance report from the newest results files: bench/results/compare-<date>.md.

    python bench/report_round2.py [--results bench/results] [--out FILE]

A thin wrapper: everything lives in ftd/bench/round2_report.py. Nothing is measured; it reads the newest
fixed-cost-, restore-, memory-, ec-, lag-, chaos- and goodput- results and writes the report next to them.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ftd.bench.round2_report import main  # noqa: E402

if __name__ == "__main__":
    if not any(a == "--results" or a.startswith("--results=") for a in sys.argv[1:]):
        sys.argv[1:1] = ["--results", str(Path(__file__).resolve().parent / "results")]
    sys.exit(main())
