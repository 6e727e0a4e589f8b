"""Cross-attention of the Q-Former's query rows into the image tokens, three ways.

- :func:`cross_attention_reference`: the plain formula (scores, softmax, dropout, weighted sum) in
  fp32, the independent reference the tests compare against;
- the ``torch`` path: ``F.scaled_dot_product_attention`` (flash / memory-efficient / cuDNN
  backends on a GPU, the math backend on a CPU), what the model ran before the kernels existed;
- the ``triton`` path: :mod:`blip2_ds.kernels.cross_attention_triton` through an autograd Function.

:func:`cross_attention` picks one by the ``kernels`` setting (see :mod:`blip2_ds.kernels`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from blip2_ds import kernels


def cross_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              key_mask: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                              dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), masked) [* keep / (1 - p)] @ v, computed in (at least) fp32.

    ``q``: (B, H, Lq, d); ``k``, ``v``: (B, H, Lk, d); ``key_mask``: (B, Lk) bool, True = attend;
    ``keep``: (B, H, Lq, Lk) bool dropout keep-mask. A row whose keys are all masked gives 0.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = q.to(compute) @ k.to(compute).transpose(-1, -2) * q.shape[-1] ** -0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if key_mask is not None:
        probs = torch.where(key_mask[:, None, None, :].any(-1, keepdim=True), probs, torch.zeros_like(probs))
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)
    return (probs @ v.to(compute)).to(q.dtype)


class _TritonCrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, dropout_p: float, seed: int):  # type: ignore[override]
        from blip2_ds.kernels import cross_attention_triton as triton_impl

        out, lse = triton_impl.forward(q, k, v, key_mask, dropout_p, seed)
        ctx.save_for_backward(q, k, v, key_mask, out, lse)
        ctx.dropout_p, ctx.seed = dropout_p, seed
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        from blip2_ds.kernels import cross_attention_triton as triton_impl

        q, k, v, key_mask, out, lse = ctx.saved_tensors
        dq, dk, dv = triton_impl.backward(grad_out, q, k, v, key_mask, out, lse, ctx.dropout_p, ctx.seed)
        return dq, dk, dv, None, None, None


def new_dropout_seed() -> int:
    """A seed for the kernels' dropout, from torch's CPU generator (so ``manual_seed`` and resumed RNG state govern it)."""
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))


def triton_cross_attention(q, k, v, key_mask=None, dropout_p: float = 0.0, seed: int | None = None) -> torch.Tensor:
    """The Triton kernel, differentiable in q, k and v."""
    kernels.check_triton_inputs("cross_attention", q, k, v)
    if dropout_p > 0 and seed is None:
        seed = new_dropout_seed()
    if key_mask is not None:
        key_mask = key_mask.bool()
    return _TritonCrossAttention.apply(q, k, v, key_mask, float(dropout_p), 0 if seed is None else seed)


def sdpa_cross_attention(q, k, v, key_mask=None, dropout_p: float = 0.0) -> torch.Tensor:
    mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _first_use_check(q, k, v, key_mask) -> None:
    """Kernel vs SDPA on copies of one call's inputs, without dropout: outputs and all three gradients."""
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)
    results = []
    for attend in (triton_cross_attention, sdpa_cross_attention):
        out = attend(*inputs, key_mask)
        results.append((out, *torch.autograd.grad(out, inputs, grad)))
    tolerance = kernels.self_check_tolerance(q.dtype)
    for name, ours, theirs in zip(("out", "dq", "dk", "dv"), *results):
        kernels.assert_close_relative(f"cross_attention {name}", ours, theirs, tolerance)


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
                    dropout_p: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """Attention of (B, H, Lq, d) queries into (B, H, Lk, d) keys/values; ``backend``: auto, triton or torch."""
    if kernels.use_triton(backend, "cross_attention", q, k, v,
                          self_check=lambda: _first_use_check(q, k, v, key_mask)):
        return triton_cross_attention(q, k, v, key_mask, dropout_p)
    return sdpa_cross_attention(q, k, v, key_mask, dropout_p)
