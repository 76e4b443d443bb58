"""Multi-turn chat benchmark, kvtier vs plain vLLM: the same as ``kvtier bench`` (see benchmarks/kvtier_bench/main.py).

    python benchmarks/bench_chat.py --preset small --out benchmarks/results/small
"""

from __future__ import annotations

import sys

from kvtier_bench.main import main

if __name__ == "__main__":  # vLLM engines are started in child processes that re-import nothing from here
    sys.exit(main(sys.argv[1:]))
