#!/usr/bin/env python
"""The step benchmark: this project's training step against the original-style eager baseline.

    python launch/bench.py [--stage 1 2] [--size real|tiny] [--batch N] [--plan --gpus 16 --gpu-memory 80]

See blip2_ds/bench/cli.py for every option and BENCHMARKS.md for measured numbers.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler behind the comm column: errors only

from blip2_ds.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
