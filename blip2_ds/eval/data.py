"""Evaluation samples read from tar shards with the evaluation transform (centre crop, no flip)."""
from __future__ import annotations

import collections

import torch

from blip2_ds.data.shards import expand_urls
from blip2_ds.data.tario import iter_samples
from blip2_ds.data.text import clean_caption
from blip2_ds.data.transforms import DeviceTransform, decode_and_crop, eval_crop, pack_images


def load_eval_pairs(pattern: str, image_size: int, limit: int | None = None,
                    extensions=("jpg", "jpeg", "png", "webp")) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(packed uint8 crops, their shapes, cleaned captions) of the first ``limit`` good samples."""
    counts: collections.Counter = collections.Counter()
    crops, captions = [], []
    for url in expand_urls(pattern):
        for _, _, fields in iter_samples(url, counts):
            extension = next((e for e in extensions if e in fields), None)
            caption = clean_caption(fields.get("txt", b"").decode("utf-8", errors="replace"))
            if extension is None or not caption:
                continue
            pixels, _ = decode_and_crop(fields[extension], eval_crop, image_size, reduced_decode=True)
            crops.append(pixels)
            captions.append(caption)
            if limit is not None and len(captions) == limit:
                return (*pack_images(crops), captions)
    return (*pack_images(crops), captions)


def eval_pixels(pattern: str, image_size: int, device, dtype=torch.float32, limit: int | None = None):
    """Normalised pixels (N, 3, S, S) on ``device`` and the captions."""
    packed, shapes, captions = load_eval_pairs(pattern, image_size, limit)
    return DeviceTransform(image_size, dtype=dtype)(packed.to(device), shapes), captions
