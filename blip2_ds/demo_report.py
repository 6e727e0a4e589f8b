"""The quickstart's summary: losses, held-out retrieval against chance, sample captions.

    python -m blip2_ds.demo_report --config configs/demo.yaml --stage1 runs/demo --stage2 runs/demo_stage2
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from blip2_ds.config import load_config
from blip2_ds.state_io import read_state_dict


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    tag = (run / "checkpoints" / "latest").read_text().strip()
    return read_state_dict(run / "checkpoints" / tag / "model.safetensors")


def _losses(run: Path, keys: tuple[str, ...]) -> str:
    log = _log(run)
    head, tail = log[: max(1, len(log) // 20)], log[-max(1, len(log) // 20):]
    parts = []
    for key in keys:
        start = sum(r[key] for r in head) / len(head)
        end = sum(r[key] for r in tail) / len(tail)
        parts.append(f"{key} {start:.3f} -> {end:.3f}")
    return f"{len(log)} steps: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    from blip2_ds.eval.features import eval_pixels
    from blip2_ds.eval.inputs import read_caption_shards
    from blip2_ds.eval.retrieval import retrieval_metrics
    from blip2_ds.data.text import tokenize_batch
    from blip2_ds.models.language import build_language_model
    from blip2_ds.models.stage1 import Stage1Model
    from blip2_ds.models.stage2 import Stage2Model
    from blip2_ds.models.vision import build_vision_tower
    from blip2_ds.train.build import build_tokenizer

    parser = argparse.ArgumentParser(prog="python -m blip2_ds.demo_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--stage1", type=Path, required=True, help="output_dir of the stage-1 run")
    parser.add_argument("--stage2", type=Path, default=None, help="output_dir of the stage-2 run")
    parser.add_argument("--val", default="demo_assets/data/val/demo-00000.tar", help="held-out shards")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cfg = load_config(args.config, args.overrides)
    tower = build_vision_tower(cfg.vision)
    tokenizer = build_tokenizer(cfg)
    held_out = read_caption_shards(args.val, limit=args.images)
    pixels = eval_pixels(held_out, cfg.data.image_size, "cpu", tower.dtype)
    captions = [image.captions[0] for image in held_out]
    with torch.no_grad():
        image_embeds = tower(pixels)
    ids, mask = tokenize_batch(tokenizer, captions, cfg.pretrained.max_text_len)
    text_image = torch.arange(len(captions))  # one caption per image; a repeated caption counts as a miss
    distinct = len(set(captions))

    print(f"\n=== stage 1 ({args.stage1}) ===")
    print("losses: " + _losses(args.stage1, ("loss", "loss_itc", "loss_itm", "loss_itg")))
    model = Stage1Model(cfg.model, cfg.objectives)
    model.load_state_dict(_weights(args.stage1))
    metrics = retrieval_metrics(model, image_embeds, ids, mask, text_image, k=16)
    chance = metrics["chance_t2i_r1"]
    print(f"held-out retrieval on {len(captions)} image-caption pairs ({distinct} distinct captions):")
    for direction, name in (("i2t", "image->text"), ("t2i", "text->image")):
        print(f"  {name}: R@1 {metrics[f'itc_{direction}_r1']:.1f} (ITC) / {metrics[f'itm_{direction}_r1']:.1f} "
              f"(ITM re-ranked), R@5 {metrics[f'itm_{direction}_r5']:.1f}, R@10 {metrics[f'itm_{direction}_r10']:.1f}"
              f"   chance R@1 {chance:.1f}")
    best = max(metrics["itm_i2t_r1"], metrics["itm_t2i_r1"], metrics["itc_i2t_r1"], metrics["itc_t2i_r1"])
    print(f"  -> R@1 is {best / chance:.1f}x chance" + ("" if best >= 3 * chance else "  (weak: train longer)"))

    if args.stage2 is not None:
        print(f"\n=== stage 2 ({args.stage2}) ===")
        print("losses: " + _losses(args.stage2, ("loss",)))
        llm = build_language_model(cfg.language)
        stage2 = Stage2Model(cfg.model, llm)
        stage2.load_state_dict(_weights(args.stage2))
        stage2.eval()
        shown = 6
        generated = stage2.generate(image_embeds[:shown], gen=cfg.generation)
        print("sample captions (held-out images):")
        for truth, text in zip(captions[:shown], generated):
            print(f"  truth: {truth:<52} generated: {text}")
    print(f"\nTensorBoard: tensorboard --logdir {args.stage1.parent}")
    print(f"checkpoints: {args.stage1 / 'checkpoints'}" + (f", {args.stage2 / 'checkpoints'}" if args.stage2 else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
