"""Image-text contrastive loss over the global batch.

Each rank scores its B local rows against the BW gathered columns (not BW x BW), with
targets ``rank * B + arange(B)``. Features are gathered WITH gradient (see
:func:`blip2_ds.distributed.all_gather_with_grad`), so W ranks with B rows each produce,
after the data-parallel gradient average, the gradient of one process on the 2B batch.

The similarity "max over queries" runs through :mod:`blip2_ds.kernels.contrastive` (the Triton
kernel never forms the (B, BW, Q) products; ``kernels`` picks it); the temperature and the
label-smoothed cross-entropy act on the (B, BW) logits here, so the temperature's gradient comes
from autograd whichever path computed the similarities.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blip2_ds import distributed
from blip2_ds.kernels.contrastive import max_over_queries_similarity
from blip2_ds.objectives import at_least_fp32, loss_range


@dataclass
class ItcResult:
    loss: torch.Tensor
    """(CE(image->text) + CE(text->image)) / 2, mean over the local rows."""
    logits_i2t: torch.Tensor
    """(B, BW): max over queries of <query_k(image_i), text_j> / temperature."""
    logits_t2i: torch.Tensor
    """(B, BW): max over queries of <text_i, query_k(image_j)> / temperature."""


def itc_loss(
    image_feats: torch.Tensor,
    text_feat: torch.Tensor,
    temperature: torch.Tensor,
    label_smoothing: float = 0.1,
    kernels: str = "auto",
) -> ItcResult:
    """``image_feats``: (B, Q, D) and ``text_feat``: (B, D), both L2-normalised, local rows.

    ``kernels``: auto / triton / torch path of the similarity (:mod:`blip2_ds.kernels`).
    """
    with loss_range("itc"):
        return itc_loss_gathered(
            image_feats, text_feat,
            distributed.all_gather_with_grad(image_feats), distributed.all_gather_with_grad(text_feat),
            temperature, label_smoothing, kernels, target_offset=distributed.rank() * image_feats.shape[0],
        )


def itc_loss_gathered(
    image_feats: torch.Tensor,
    text_feat: torch.Tensor,
    image_all: torch.Tensor,
    text_all: torch.Tensor,
    temperature: torch.Tensor,
    label_smoothing: float,
    kernels: str,
    target_offset: int,
) -> ItcResult:
    """The loss once the global batch is at hand: local rows against ``image_all`` / ``text_all``
    (BW rows) whose rows ``target_offset + arange(B)`` are the local pairs' positives."""
    logits_i2t = max_over_queries_similarity(image_feats, text_all, kernels) / temperature
    logits_t2i = max_over_queries_similarity(image_all, text_feat, kernels).t() / temperature
    targets = torch.arange(image_feats.shape[0], device=image_feats.device) + target_offset
    loss = (
        F.cross_entropy(at_least_fp32(logits_i2t), targets, label_smoothing=label_smoothing)
        + F.cross_entropy(at_least_fp32(logits_t2i), targets, label_smoothing=label_smoothing)
    ) / 2
    return ItcResult(loss, logits_i2t, logits_t2i)
