"""Evaluation during training: every ``eval_every`` steps, on the first ``eval_samples`` of ``eval_data``.

Stage 1: retrieval R@1/5/10 (ITC and ITM re-ranked, top 16); stage 2: BLEU / ROUGE-L / CIDEr of
generated captions (METEOR's several-second JVM start is left to ``python -m blip2_ds.eval``), plus
a few images with their generated and reference captions. All ranks take part (the work is split
as in ``python -m blip2_ds.eval``); rank 0 writes TensorBoard. The evaluation runs in eval mode
inside ``torch.random.fork_rng``, so the training that follows draws the same random numbers as
without it (the per-step losses do not change, and resume stays exact).
"""
from __future__ import annotations

from typing import Any

import torch

from blip2_ds.config import Config
from blip2_ds.eval import tasks
from blip2_ds.eval.features import eval_pixels
from blip2_ds.eval.inputs import read_caption_shards

SHOWN_IMAGES = 4
RERANK_K = 16
TRAINING_CAPTION_METRICS = ("BLEU", "ROUGE_L", "CIDEr")


class PeriodicEval:
    def __init__(self, cfg: Config, tower, tokenizer, device: torch.device, batch_size: int = 32):
        self.cfg, self.tower, self.tokenizer, self.device, self.batch_size = cfg, tower, tokenizer, device, batch_size
        self.images = read_caption_shards(cfg.eval_data, cfg.eval_samples)  # a few hundred JPEGs, kept in memory

    def due(self, step: int) -> bool:
        return bool(self.cfg.eval_every) and step % self.cfg.eval_every == 0

    def __call__(self, module: torch.nn.Module, step: int, logger) -> dict[str, Any]:
        cfg = self.cfg
        was_training = module.training
        module.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                if cfg.stage == 1:
                    result = tasks.retrieval(module, self.tower, self.tokenizer, cfg.pretrained.max_text_len,
                                             self.images, cfg.data.image_size, self.device, RERANK_K, self.batch_size)
                else:
                    result = tasks.captioning(module, self.tower, self.images, cfg.data.image_size, self.device,
                                              cfg.language.prompt, cfg.generation, self.batch_size,
                                              TRAINING_CAPTION_METRICS)
        finally:
            module.train(was_training)
        shown, captions = None, ()
        if cfg.stage == 2:
            shown = eval_pixels(self.images[:SHOWN_IMAGES], cfg.data.image_size, "cpu", normalise=False)
            captions = [(p["caption"], p["references"][0]) for p in result["predictions"][:SHOWN_IMAGES]]
        logger.log_eval(step, result["metrics"], shown, captions)
        return result
