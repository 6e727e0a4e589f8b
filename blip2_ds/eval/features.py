"""Images -> frozen vision-tower features, and splitting evaluation work across ranks.

Evaluation uses the training pipeline's decode (libjpeg-turbo, reduced-scale when possible) with
the evaluation crop (the centre square, i.e. resize-shorter-side + centre-crop) and the same
device-side resize and normalisation, so a model is evaluated on what it was trained to see.
Each rank takes a contiguous share of the items; :func:`gather` puts the shares back in order.
"""
from __future__ import annotations

from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

from blip2_ds import distributed
from blip2_ds.data.transforms import DeviceTransform, decode_and_crop, eval_crop, pack_images
from blip2_ds.eval.inputs import EvalImage

T = TypeVar("T")


def rank_share(items: Sequence[T]) -> list[T]:
    """This rank's contiguous slice of ``items`` (sizes differ by at most one between ranks)."""
    sizes = _share_sizes(len(items))
    start = sum(sizes[:distributed.rank()])
    return list(items[start:start + sizes[distributed.rank()]])


def gather(share: list) -> list:
    """Every rank's ``share`` concatenated in rank order (picklable objects; tensors go to the CPU)."""
    if not distributed.is_distributed():
        return list(share)
    parts: list = [None] * distributed.world_size()
    dist.all_gather_object(parts, [x.cpu() if isinstance(x, torch.Tensor) else x for x in share])
    return [x for part in parts for x in part]


def _share_sizes(total: int) -> list[int]:
    world = distributed.world_size()
    per, extra = divmod(total, world)
    return [per + (rank < extra) for rank in range(world)]


def gather_rows(share: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank's :func:`rank_share` rows of a tensor, concatenated back into ``total`` rows in order.

    One padded all-gather of the tensor itself (ViT features are GBs: no pickling).
    """
    if not distributed.is_distributed():
        return share
    sizes = _share_sizes(total)
    padded = share.new_zeros((max(sizes), *share.shape[1:]))
    padded[:len(share)] = share
    gathered = distributed.all_gather_no_grad(padded).view(len(sizes), max(sizes), *share.shape[1:])
    return torch.cat([gathered[rank, :size] for rank, size in enumerate(sizes)])


def eval_pixels(images: Sequence[EvalImage], image_size: int, device: torch.device | str,
                dtype: torch.dtype = torch.float32, normalise: bool = True) -> torch.Tensor:
    """The evaluation crops (centre square) of ``images`` resized to ``image_size`` on ``device``:
    (N, 3, S, S), CLIP-normalised as in training, or in [0, 1] for display (``normalise=False``)."""
    packed, shapes = pack_images([decode_and_crop(image.read(), eval_crop, image_size, reduced_decode=True)[0]
                                  for image in images])
    plain = {} if normalise else dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return DeviceTransform(image_size, dtype=dtype, **plain)(packed.to(device), shapes)  # shapes stay on the host


@torch.no_grad()
def image_features(tower: torch.nn.Module, images: Sequence[EvalImage], image_size: int,
                   device: torch.device | str, batch_size: int = 64) -> torch.Tensor:
    """The frozen tower's tokens (N, tokens, width) for ``images`` (at least one), in order, in the tower's dtype."""
    if not images:
        raise ValueError("image_features needs at least one image.")
    dtype = next(tower.parameters()).dtype
    return torch.cat([tower(eval_pixels(images[start:start + batch_size], image_size, device, dtype))
                      for start in range(0, len(images), batch_size)])
