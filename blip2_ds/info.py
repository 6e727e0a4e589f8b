"""Parameter counts of a configuration, built on the meta device (no memory, no weights).

    python -m blip2_ds.info [--config configs/X.yaml] [key=value ...]

Prints the trainable stage-1 parameters per component and the frozen vision tower's size
(the open_clip/timm definition, minus the last block and final norm that BLIP-2 drops).
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch
from torch import nn

from blip2_ds.config import ConfigError, load_config
from blip2_ds.models.stage1 import Stage1Model

VISION_TOWERS = {1408: "EVA01-g-14", 1024: "ViT-L-14-quickgelu"}


def count(module: nn.Module | nn.Parameter) -> int:
    if isinstance(module, nn.Parameter):
        return module.numel()
    return sum(p.numel() for p in module.parameters())


def stage1_breakdown(model: Stage1Model) -> dict[str, int]:
    q = model.qformer
    text_parts = count(q.word_embeddings) + count(q.position_embeddings) + count(q.lm_head) + sum(
        count(layer.text_ffn) for layer in q.layers)
    cross = sum(count(layer.cross_attn) for layer in q.layers if layer.cross_attn is not None)
    return {
        "query_tokens": count(model.query_tokens),
        "ln_vision": count(model.ln_vision),
        "qformer: text parts (embeddings, text FFNs, LM head bias/transform)": text_parts,
        "qformer: cross-attention": cross,
        "qformer: rest (self-attention, query FFNs, embedding norm)": count(q) - text_parts - cross,
        "vision_proj + text_proj + itm_head + temp": count(model.vision_proj) + count(model.text_proj)
        + count(model.itm_head) + count(model.temp),
    }


def frozen_vision_count(vision_width: int) -> tuple[str, int] | None:
    """Parameters BLIP-2 keeps of the open_clip vision tower of this width (meta device)."""
    name = VISION_TOWERS.get(vision_width)
    if name is None:
        return None
    import open_clip
    import timm

    vision_cfg = open_clip.get_model_config(name)["vision_cfg"]
    with torch.device("meta"):
        if "timm_model_name" in vision_cfg:
            tower = timm.create_model(vision_cfg["timm_model_name"], pretrained=False, num_classes=0)
            dropped = (tower.blocks[-1], tower.norm, tower.fc_norm, tower.head)
            return name, count(tower) - sum(count(part) for part in dropped)
        logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that no weights were loaded
        tower = open_clip.create_model(name, pretrained=None, device="meta").visual
    kept = [tower.conv1, tower.ln_pre, tower.class_embedding, tower.positional_embedding,
            *tower.transformer.resblocks[:-1]]
    return name, sum(count(part) for part in kept)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip2_ds.info", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (default: BLIP-2 ViT-g sizes)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.vision_width=1024")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with torch.device("meta"):
        model = Stage1Model(cfg.model, cfg.objectives)
    print("stage 1 trainable parameters:")
    for name, value in stage1_breakdown(model).items():
        print(f"  {name:<70} {value:>13,}")
    print(f"  {'total':<70} {count(model):>13,}")
    frozen = frozen_vision_count(cfg.model.vision_width)
    if frozen is not None:
        print(f"frozen parameters:\n  {'vision tower ' + frozen[0] + ' (last block and final norm dropped)':<70} "
              f"{frozen[1]:>13,}")
    else:
        print(f"frozen parameters: no known vision tower of width {cfg.model.vision_width}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
