"""The Q-Former's three self-attention masks.

All masks are boolean, shaped (B, 1, rows, keys) for broadcasting over heads, True where
attention is allowed. Keys are ordered [queries; text]. ``text_mask`` is the tokenizer's
attention mask (B, T): 1 for real tokens, 0 for padding.

- ITC, text pass: text only; every token sees every non-pad token (queries are absent, so
  text cannot see them). The image pass has queries only and needs no mask.
- ITM: queries and text see each other fully (bi-directional), pad keys hidden.
- ITG (UniLM): queries see only queries; text token t sees all queries and text tokens <= t.
"""
from __future__ import annotations

import torch


def _text_keys(text_mask: torch.Tensor) -> torch.Tensor:
    return text_mask.bool()[:, None, None, :]


def unimodal_text_mask(text_mask: torch.Tensor) -> torch.Tensor:
    """ITC text pass: (B, 1, 1, T), pad keys hidden."""
    return _text_keys(text_mask)


def bidirectional_mask(text_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """ITM pass over [queries; text]: (B, 1, 1, Q + T), only pad keys hidden."""
    query_keys = text_mask.new_ones((text_mask.shape[0], num_queries), dtype=torch.bool)
    return torch.cat([query_keys, text_mask.bool()], dim=1)[:, None, None, :]


def multimodal_causal_mask(text_mask: torch.Tensor, num_queries: int, query_rows: bool = True) -> torch.Tensor:
    """ITG pass: (B, 1, rows, Q + T) with rows = Q + T, or T when ``query_rows`` is False.

    ``query_rows=False`` is the mask of the text rows alone, used when the query rows were
    already computed by the image pass and their self-attention keys/values are reused.
    """
    batch, length = text_mask.shape
    device = text_mask.device
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    text_rows = torch.cat(
        [torch.ones(length, num_queries, dtype=torch.bool, device=device), causal], dim=1
    )[None, None] & torch.cat(
        [torch.ones(batch, num_queries, dtype=torch.bool, device=device), text_mask.bool()], dim=1
    )[:, None, None, :]
    if not query_rows:
        return text_rows
    query_block = torch.cat(
        [torch.ones(num_queries, num_queries, dtype=torch.bool, device=device),
         torch.zeros(num_queries, length, dtype=torch.bool, device=device)], dim=1
    )[None, None].expand(batch, 1, -1, -1)
    return torch.cat([query_block, text_rows], dim=2)
