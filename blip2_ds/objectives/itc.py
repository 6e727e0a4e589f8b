"""Image-text contrastive loss over the global batch.

Each rank scores its B local rows against the BW gathered columns (not BW x BW), with
targets ``rank * B + arange(B)``. Features are gathered WITH gradient (see
:func:`blip2_ds.distributed.all_gather_with_grad`), so W ranks with B rows each produce,
after the data-parallel gradient average, the gradient of one process on the 2B batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blip2_ds import distributed
from blip2_ds.objectives import at_least_fp32


@dataclass
class ItcResult:
    loss: torch.Tensor
    """(CE(image->text) + CE(text->image)) / 2, mean over the local rows."""
    logits_i2t: torch.Tensor
    """(B, BW): max over queries of <query_k(image_i), text_j> / temperature."""
    logits_t2i: torch.Tensor
    """(B, BW): max over queries of <text_i, query_k(image_j)> / temperature."""


def max_over_queries_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """(Bi, Q, D) x (Bt, D) -> (Bi, Bt): for each pair, the best-matching query's cosine similarity."""
    return torch.einsum("iqd,td->iqt", image_feats, text_feats).amax(dim=1)


def itc_loss(
    image_feats: torch.Tensor,
    text_feat: torch.Tensor,
    temperature: torch.Tensor,
    label_smoothing: float = 0.1,
) -> ItcResult:
    """``image_feats``: (B, Q, D) and ``text_feat``: (B, D), both L2-normalised, local rows."""
    image_all = distributed.all_gather_with_grad(image_feats)
    text_all = distributed.all_gather_with_grad(text_feat)
    logits_i2t = max_over_queries_similarity(image_feats, text_all) / temperature
    logits_t2i = max_over_queries_similarity(image_all, text_feat).t() / temperature
    batch = image_feats.shape[0]
    targets = torch.arange(batch, device=image_feats.device) + distributed.rank() * batch
    loss = (
        F.cross_entropy(at_least_fp32(logits_i2t), targets, label_smoothing=label_smoothing)
        + F.cross_entropy(at_least_fp32(logits_t2i), targets, label_smoothing=label_smoothing)
    ) / 2
    return ItcResult(loss, logits_i2t, logits_t2i)
