"""ftd against torch.save, torch.distributed.checkpoint, torchsnapshot and memcpy on the same state.

    python bench/compare.py [--sizes 256MiB,1GiB] [--repeats 3] ...   (the same as `ftd bench`)

A thin wrapper: everything lives in ftd/bench/compare.py. Results go to bench/results/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ftd.bench.compare import main  # noqa: E402

if __name__ == "__main__":
    if not any(a == "--out-dir" or a.startswith("--out-dir=") for a in sys.argv[1:]):
        sys.argv[1:1] = ["--out-dir", str(Path(__file__).resolve().parent / "results")]
    sys.exit(main())
