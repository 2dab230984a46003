"""Engine speed at a preset's real shapes with dummy weights (see `qwen3coder bench --help`).

    python benchmarks/bench_decode.py --preset 30b-a3b --compare-transformers
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen3coder.bench.decode import main  # noqa: E402

if __name__ == "__main__":
    main()
