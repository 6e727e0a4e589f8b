#!/usr/bin/env python
"""Evaluate a checkpoint (retrieval / caption / vqa); see ``python -m blip2_ds.eval --help``.

    python launch/eval.py caption --checkpoint runs/stage2 --captions coco_karpathy_test.json --images /data/coco
    torchrun --nproc_per_node 8 launch/eval.py retrieval --checkpoint runs/stage1 --captions ... --images ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip2_ds.eval.__main__ import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
