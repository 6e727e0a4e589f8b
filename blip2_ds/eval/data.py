"""Held-out pairs from tar shards as normalised pixels (the quickstart's summary)."""
from __future__ import annotations

import torch

from blip2_ds.data.transforms import DeviceTransform, decode_and_crop, eval_crop, pack_images
from blip2_ds.eval.inputs import read_caption_shards


def eval_pixels(pattern: str, image_size: int, device, dtype=torch.float32, limit: int | None = None):
    """Normalised pixels (N, 3, S, S) on ``device`` of the first ``limit`` good samples, and their captions."""
    images = read_caption_shards(pattern, limit)
    packed, shapes = pack_images([decode_and_crop(image.data, eval_crop, image_size, reduced_decode=True)[0]
                                  for image in images])
    return DeviceTransform(image_size, dtype=dtype)(packed.to(device), shapes), [image.captions[0] for image in images]
