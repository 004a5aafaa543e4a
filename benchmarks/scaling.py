"""Scaling study: decode time and peak memory as the number of experts and the budget grow.

The study lives in pcmoe/bench/scaling.py (see its docstring); this script is its command line:

    .venv/bin/python benchmarks/scaling.py --out results/scaling [--experts 16,32,64] [--quick]
    pcmoe bench --scaling        # the same study, run after the suite into <out>/scaling
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcmoe.bench.scaling import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
