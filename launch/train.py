#!/usr/bin/env python
"""Train BLIP-2 (stage 1 or 2) with DeepSpeed.

    deepspeed launch/train.py --ds ds_configs/zero2.json [--config configs/X.yaml] [key=value ...]
    torchrun --nproc_per_node 2 launch/train.py ...      python launch/train.py ...   (single process)

Without --config it trains the embedded demo (tiny towers, synthetic shards, created if missing).
Everything that can be checked is checked before any process group starts: a bad config exits
with status 2 and one line saying what to fix. A run that stops itself (non-finite losses, out of
memory) exits with status 1 and a line saying what to change.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ds", default=str(ROOT / "ds_configs" / "zero2.json"), help="DeepSpeed JSON config")
    parser.add_argument("--config", default=None, help="YAML config (default: the embedded demo)")
    parser.add_argument("--resume", default=None,
                        help="'latest', a checkpoint folder, a step tag, or 'auto' (latest if the run has a checkpoint, "
                             "else start fresh: what the SLURM scripts use, so a requeued job continues)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build on the meta device, print parameter counts, batch decomposition, memory; exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. max_steps=1000 data.train=...")
    return parser.parse_intermixed_args(argv)  # key=value overrides may come before and after options


def _ensure_demo_assets() -> None:
    """Create the demo's data and tiny towers once (concurrent ranks wait on its file lock)."""
    from blip2_ds.demo_assets import ensure_demo_assets

    ensure_demo_assets(root=ROOT / "demo_assets")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from blip2_ds.config import ConfigError, load_config
    from blip2_ds.train.build import check_run
    from blip2_ds.data.stream import DataError
    from blip2_ds.train.checkpoint import CheckpointError
    from blip2_ds.train.loop import TrainingError

    try:
        config_path = args.config
        if config_path is None:
            _ensure_demo_assets()
            config_path = DEMO_CONFIG
        cfg = load_config(config_path, args.overrides)
        plan = check_run(cfg, args.ds, strict=not args.dry_run)
        if args.dry_run:
            from blip2_ds.train.dry_run import report

            print(report(cfg, plan))
            return 0
        from blip2_ds.train.run import train

        return train(cfg, plan, resume=args.resume)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (TrainingError, DataError) as err:  # the message says what happened and what to change; the checkpoints stay
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from blip2_ds.train import signals

    signals.install()  # before torch is imported: a preemption notice during startup is kept, not fatal
    sys.exit(main())
