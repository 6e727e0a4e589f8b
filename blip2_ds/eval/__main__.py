"""Evaluate a checkpoint: retrieval (stage 1), captioning or zero-shot VQA (stage 2).

    python -m blip2_ds.eval retrieval --checkpoint runs/demo --shards 'demo_assets/data/val/demo-00000.tar'
    python -m blip2_ds.eval caption   --checkpoint runs/stage2 --captions coco_karpathy_test.json --images /data/coco
    python -m blip2_ds.eval vqa       --checkpoint runs/stage2 --questions Q.json --annotations A.json --images val2014/
    torchrun --nproc_per_node 8 launch/eval.py caption ...          (the work is split across ranks and gathered)

``--checkpoint``: a run's output_dir (its ``checkpoints/latest``), a checkpoint folder, or a
``model.safetensors``; its ``config.yaml`` is used unless ``--config`` is given. Trailing
``key=value`` arguments override the config (e.g. ``generation.num_beams=3``). Writes a JSON file
of metrics and per-sample predictions (``--out``, default ``<checkpoint folder>/eval_<task>.json``)
and prints a table. Exit status 2 with one line for bad input, before any model is built.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blip2_ds import distributed, launch_env
from blip2_ds.config import Config, ConfigError
from blip2_ds.trained import build_trained, load_checkpoint_config, resolve_weights

TASK_STAGE = {"retrieval": 1, "caption": 2, "vqa": 2}
VQA_PROMPT = "Question: {} Answer:"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m blip2_ds.eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("task", choices=sorted(TASK_STAGE))
    parser.add_argument("--checkpoint", required=True, help="run output_dir, checkpoint folder or model.safetensors")
    parser.add_argument("--config", default=None, help="YAML config (default: config.yaml beside the weights)")
    data = parser.add_argument_group("inputs (one of: --captions + --images, --shards, --questions + --images)")
    data.add_argument("--captions", help="caption JSON: Karpathy dataset_coco.json, LAVIS coco_karpathy_*.json or COCO captions_*.json")
    data.add_argument("--split", default="test", help="Karpathy split to evaluate (default: test)")
    data.add_argument("--shards", help="tar shards (brace pattern), one caption per sample")
    data.add_argument("--questions", help="VQAv2 questions JSON")
    data.add_argument("--annotations", help="VQAv2 annotations JSON (for the accuracy)")
    data.add_argument("--images", help="the folder the JSON's image paths are relative to")
    data.add_argument("--image-pattern", default=None, help="VQA image file name, default COCO_{data_subtype}_{image_id:012d}.jpg")
    data.add_argument("--limit", type=int, default=None, help="evaluate the first N images / questions")
    parser.add_argument("--k", type=int, default=128, help="retrieval: ITC candidates re-ranked by ITM (paper: 128)")
    parser.add_argument("--prompt", default=None,
                        help=f"caption: text prompt (default language.prompt); vqa: template (default {VQA_PROMPT!r})")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return parser.parse_args(argv)


@dataclass
class Inputs:
    images: list | None = None
    """EvalImage list (retrieval, caption)."""
    questions: list | None = None
    """VqaQuestion list (vqa)."""


def read_inputs(args: argparse.Namespace) -> Inputs:
    from blip2_ds.eval import inputs

    if args.task == "vqa":
        if not (args.questions and args.images):
            raise ConfigError("vqa needs --questions (and --annotations to score) and --images.")
        return Inputs(questions=inputs.read_vqa(args.questions, args.annotations, args.images, args.image_pattern,
                                                args.limit))
    if args.captions:
        if not args.images:
            raise ConfigError("--captions needs --images (the folder its image paths are relative to).")
        return Inputs(images=inputs.read_caption_json(args.captions, args.images, args.split or None, args.limit))
    if args.shards:
        return Inputs(images=inputs.read_caption_shards(args.shards, args.limit))
    raise ConfigError(f"{args.task} needs --captions + --images or --shards.")


def check(args: argparse.Namespace) -> tuple[Config, Path, Inputs]:
    """Everything cheap, before any model: weights, config, stage, inputs (all files exist), the launcher's
    environment (partial or contradictory is an error) and at least one input per rank."""
    weights = resolve_weights(args.checkpoint)
    cfg = load_checkpoint_config(weights, args.config, args.overrides)
    if cfg.stage != TASK_STAGE[args.task]:
        raise ConfigError(f"{args.task} evaluates a stage-{TASK_STAGE[args.task]} model; {weights} is stage {cfg.stage} "
                          f"(by {args.config or weights.parent / 'config.yaml'}).")
    items = read_inputs(args)
    count = len(items.images if items.images is not None else items.questions)
    ranks = launch_env.detect().world_size  # the process group does not exist yet
    if count < ranks:
        raise ConfigError(f"{count} inputs for {ranks} ranks: every rank needs one; use fewer ranks.")
    return cfg, weights, items


def evaluate(args: argparse.Namespace, cfg: Config, items: Inputs, tower, model, device) -> dict[str, Any]:
    from blip2_ds.eval import tasks

    size = cfg.data.image_size
    if args.task == "retrieval":
        from blip2_ds.train.build import build_tokenizer

        return tasks.retrieval(model, tower, build_tokenizer(cfg), cfg.pretrained.max_text_len, items.images, size,
                               device, args.k, args.batch_size)
    if args.task == "caption":
        prompt = cfg.language.prompt if args.prompt is None else args.prompt
        return tasks.captioning(model, tower, items.images, size, device, prompt, cfg.generation, args.batch_size)
    return tasks.vqa(model, tower, items.questions, size, device, args.prompt or VQA_PROMPT, cfg.generation,
                     args.batch_size)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, weights, items = check(args)
    except (ConfigError, launch_env.LaunchEnvError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from blip2_ds.train.engine import init_distributed

    init_distributed()
    device = distributed.local_device()
    torch.manual_seed(cfg.seed)
    tower, model = build_trained(cfg, weights, device)
    with torch.no_grad():
        result = evaluate(args, cfg, items, tower, model, device)
    if distributed.rank() == 0:
        out = args.out or weights.parent / f"eval_{args.task}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"task": args.task, "checkpoint": str(weights), **result}, indent=1))
        print(format_table(args.task, result["metrics"], result.get("unavailable", {})))
        print(f"written: {out}")
    return 0


def format_table(task: str, metrics: dict[str, float | None], unavailable: dict[str, str]) -> str:
    lines = [f"{task} (recall and VQA accuracy in %, caption metrics on coco-caption's scale):",
             f"  {'metric':<20} {'value':>9}"]
    for name, value in metrics.items():
        lines.append(f"  {name:<20} {'n/a' if value is None else f'{value:9.4f}':>9}")
    for name, why in unavailable.items():
        lines.append(f"  {name}: not computed ({why})")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
