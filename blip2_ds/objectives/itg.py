"""Image-grounded text generation: shifted cross-entropy under the multimodal-causal mask.

The text pass's input is the caption with its first token ([CLS]) replaced by ``[DEC]``; the
labels are the same ids with padding ignored. The token count is summed over ranks, so the
rank-average of the losses is the mean over all tokens of the global batch (what one process
on the whole batch computes), whatever the per-rank padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from blip2_ds import distributed
from blip2_ds.objectives import at_least_fp32, loss_range

IGNORE_INDEX = -100


def decoder_inputs(text_ids: torch.Tensor, text_mask: torch.Tensor, bos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder input ids with [DEC] at position 0, labels with padding set to IGNORE_INDEX)."""
    decoder_ids = text_ids.clone()
    decoder_ids[:, 0] = bos_token_id
    labels = decoder_ids.masked_fill(text_mask == 0, IGNORE_INDEX)
    return decoder_ids, labels


def next_token_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which hidden states predict a real token, and that token: (B, T-1) bool, (N,) targets.

    Selecting them before the LM head avoids computing vocabulary logits for padding.
    """
    targets = labels[:, 1:]
    predicting = targets != IGNORE_INDEX
    return predicting, targets[predicting]


def itg_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """``logits``: (N, V) at the predicting positions, ``targets``: (N,)."""
    with loss_range("itg"):
        local_sum = F.cross_entropy(at_least_fp32(logits), targets, label_smoothing=label_smoothing,
                                    reduction="sum")
        count = torch.tensor(float(targets.numel()), device=logits.device)
        global_count = distributed.all_reduce_sum(count)
        return local_sum * distributed.world_size() / global_count.clamp(min=1.0)
