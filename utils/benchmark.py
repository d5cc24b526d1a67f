"""`python -m utils.benchmark`: the entry point kept where users and doc/PERFORMANCE.md know it; the code is
utils/perf/benchmark.py."""
import sys

from utils.perf.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
