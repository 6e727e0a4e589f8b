"""The ITC similarity "for each pair, the best-matching query", two ways.

- :func:`max_over_queries_reference`: einsum over (Bi, Q, Bt) then ``amax`` (the torch path and
  the independent reference);
- the ``triton`` path: :mod:`blip2_ds.kernels.contrastive_triton`, which never forms the
  (Bi, Q, Bt) tensor and keeps the winning query per pair for backward.

:func:`max_over_queries_similarity` picks one by the ``kernels`` setting. The rest of the ITC loss
(temperature, label-smoothed cross-entropy over the gathered columns, the rank offset of the
targets) runs on the (B, BW) logits in :mod:`blip2_ds.objectives.itc`: those logits are outputs
anyway (the hard-negative draw samples from them), so the kernel removes everything of size
(B, BW, Q) and leaves only (B, BW) tensors.
"""
from __future__ import annotations

import torch

from blip2_ds import kernels


def max_over_queries_reference(query_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """(Bi, Q, D) x (Bt, D) -> (Bi, Bt): max over q of <query_feats[i, q], text_feats[t]>."""
    return torch.einsum("iqd,td->iqt", query_feats, text_feats).amax(dim=1)


class _TritonMaxOverQueries(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query_feats, text_feats):  # type: ignore[override]
        from blip2_ds.kernels import contrastive_triton

        sims, winners = contrastive_triton.forward(query_feats, text_feats)
        ctx.save_for_backward(query_feats, text_feats, winners)
        ctx.mark_non_differentiable(winners)
        return sims

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        from blip2_ds.kernels import contrastive_triton

        query_feats, text_feats, winners = ctx.saved_tensors
        return contrastive_triton.backward(grad, winners, query_feats, text_feats)


def triton_max_over_queries(query_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """The Triton kernel: fp32 (Bi, Bt) similarities, differentiable in both inputs."""
    kernels.check_triton_inputs("contrastive", query_feats, text_feats)
    if query_feats.dim() != 3 or text_feats.dim() != 2 or query_feats.shape[-1] != text_feats.shape[-1]:
        raise ValueError(f"need (Bi, Q, D) and (Bt, D), got {tuple(query_feats.shape)} and {tuple(text_feats.shape)}")
    return _TritonMaxOverQueries.apply(query_feats, text_feats)


def routed_gradients_reference(grad: torch.Tensor, winners: torch.Tensor, query_feats: torch.Tensor,
                               text_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of the max when pair (i, t)'s gradient goes to query ``winners[i, t]`` (plain torch, fp32+).

    Equals autograd through ``amax`` except on exact ties, which ``amax`` splits evenly.
    """
    compute = torch.promote_types(query_feats.dtype, torch.float32)
    routed = torch.nn.functional.one_hot(winners.long(), query_feats.shape[1]).to(compute) * grad.to(compute)[..., None]
    d_query = torch.einsum("itq,td->iqd", routed, text_feats.to(compute))
    d_text = torch.einsum("itq,iqd->td", routed, query_feats.to(compute))
    return d_query, d_text


_CHECK_ROWS = 512
"""Most images and texts the first-use check takes from a call: its fp32 references hold (Bi, Bt, Q)
tensors, 16 GB for a 5k-image x 25k-text retrieval call, the very tensor the kernel exists to avoid."""


def _check_rows(rows: int) -> int:
    return rows if rows <= _CHECK_ROWS else _CHECK_ROWS + rows % 128  # the call's partial last tile too


def _first_use_check(query_feats: torch.Tensor, text_feats: torch.Tensor) -> None:
    """Kernel vs fp32 torch on (the first rows of) one call's inputs. Tie-proof: the winners must be maximal
    (to rounding) and the gradients must be those of routing each pair to its winner."""
    from blip2_ds.kernels import contrastive_triton

    query_feats, text_feats = query_feats[:_check_rows(len(query_feats))], text_feats[:_check_rows(len(text_feats))]
    sims, winners = contrastive_triton.forward(query_feats, text_feats)
    grad = torch.randn_like(sims)
    d_query, d_text = contrastive_triton.backward(grad, winners, query_feats, text_feats)
    wide_query, wide_text = query_feats.float(), text_feats.float()
    tolerance = kernels.self_check_tolerance(query_feats.dtype)
    kernels.assert_close_relative("contrastive similarity", sims, max_over_queries_reference(wide_query, wide_text),
                                  tolerance)
    chosen = torch.einsum("itd,td->it", wide_query[torch.arange(len(winners), device=winners.device)[:, None],
                                                   winners.long()], wide_text)
    kernels.assert_close_relative("contrastive winner's similarity", sims, chosen, tolerance)
    for name, ours, theirs in zip(("d_query", "d_text"), (d_query, d_text),
                                  routed_gradients_reference(grad, winners, wide_query, wide_text)):
        kernels.assert_close_relative(f"contrastive {name}", ours, theirs, tolerance)


def max_over_queries_similarity(query_feats: torch.Tensor, text_feats: torch.Tensor,
                                backend: str = "auto") -> torch.Tensor:
    """(Bi, Q, D) x (Bt, D) -> (Bi, Bt) best-query similarity; ``backend``: auto, triton or torch.

    The Triton path returns fp32 whatever the input dtype; the torch path keeps the input dtype.
    """
    if kernels.use_triton(backend, "contrastive", query_feats, text_feats,
                          self_check=lambda: _first_use_check(query_feats, text_feats)):
        return triton_max_over_queries(query_feats, text_feats)
    return max_over_queries_reference(query_feats, text_feats)
