"""Image-text matching with hard negatives drawn from the global batch.

Negatives are drawn in one vectorised call, without host synchronisation: a Gumbel-max draw
over the ITC logits is exactly a draw from ``softmax(logits)`` (what the original's
``torch.multinomial`` samples from), and its noise comes from a generator seeded identically
on every rank for the whole (BW, BW) matrix, so the negatives depend only on the global
batch and the seed, not on how the batch is split over ranks.

Non-finite logits (fp16 overflow, a diverged step) never crash the draw. Per row:
- NaN entries are never chosen;
- if some entries are +inf, the draw is uniform among them (the limit of the softmax);
- if no entry is selectable (all NaN / -inf), the draw is uniform over the other samples.
The positive (the row's own sample) is never chosen.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blip2_ds.objectives import at_least_fp32, loss_range


def _selectable_logits(logits: torch.Tensor, positive_cols: torch.Tensor) -> torch.Tensor:
    logits = at_least_fp32(logits)
    is_pos_inf = logits == float("inf")
    has_pos_inf = is_pos_inf.any(dim=1, keepdim=True)
    neg_inf = torch.full_like(logits, float("-inf"))
    logits = torch.where(has_pos_inf, torch.where(is_pos_inf, torch.zeros_like(logits), neg_inf), logits)
    logits = torch.where(torch.isnan(logits), neg_inf, logits)
    rows = torch.arange(logits.shape[0], device=logits.device)
    logits[rows, positive_cols] = float("-inf")
    nothing_selectable = ~torch.isfinite(logits).any(dim=1, keepdim=True)
    uniform = torch.zeros_like(logits)
    uniform[rows, positive_cols] = float("-inf")
    return torch.where(nothing_selectable, uniform, logits)


@torch.no_grad()
def sample_hard_negatives(
    logits_i2t: torch.Tensor, logits_t2i: torch.Tensor, row_offset: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one negative text per local image and one negative image per local text.

    ``logits_*``: (B, BW) local rows against the global batch; row i's positive is column
    ``row_offset + i``. Returns global column indices (B,) each: (negative text per image,
    negative image per text).
    """
    batch, global_batch = logits_i2t.shape
    if global_batch < 2:
        raise ValueError("ITM hard negatives need a global batch of at least 2 samples.")
    with loss_range("itm_negatives"):
        device = logits_i2t.device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        uniform = torch.rand((2, global_batch, global_batch), generator=generator, device=device)
        uniform = uniform[:, row_offset:row_offset + batch]
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20, max=1 - 1e-7)))
        positives = torch.arange(batch, device=device) + row_offset
        neg_text = (_selectable_logits(logits_i2t, positives) + gumbel[0]).argmax(dim=1)
        neg_image = (_selectable_logits(logits_t2i, positives) + gumbel[1]).argmax(dim=1)
        return neg_text, neg_image


@dataclass
class ItmResult:
    loss: torch.Tensor
    """Cross-entropy over the 3B pairs [positive, (text, negative image), (negative text, image)]."""
    accuracy: torch.Tensor
    """Fraction of the 3B pairs classified correctly."""


def itm_labels(batch: int, device: torch.device) -> torch.Tensor:
    """[1] * B positives, then [0] * 2B negatives, in the order the pairs are built."""
    labels = torch.zeros(3 * batch, dtype=torch.long, device=device)
    labels[:batch] = 1
    return labels


def itm_loss(logits: torch.Tensor) -> ItmResult:
    """``logits``: (3B, 2), pairs ordered as in :func:`itm_labels`."""
    with loss_range("itm"):
        labels = itm_labels(logits.shape[0] // 3, logits.device)
        loss = F.cross_entropy(at_least_fp32(logits), labels)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return ItmResult(loss, accuracy)
