"""Triton "max over queries" similarity for the gathered ITC loss.

``sim[i, t] = max_q <A[i, q, :], T[t, :]>`` for query features A (NI, Q, D) and text features
T (NT, D). The torch path materialises the (NI, Q, NT) products (and, in backward, a gradient of
that size); here each program keeps a (BLOCK_I, BLOCK_T) tile of running maxima and their
argmax in registers while it loops over the queries, and only the (NI, NT) maxima and argmax
are written. Backward routes the (NI, NT) logit gradient G to the winning query only:

    dA[i, q, :] = sum_t G[i, t] [argmax[i, t] == q] T[t, :]      one program per (rows, query, d-block)
    dT[t, :]    = sum_i sum_q G[i, t] [argmax[i, t] == q] A[i, q, :]   one program per (texts, d-block, i-split)

both as tile matrix products, deterministic (no atomics): when there are few texts (the t2i
direction's 210 local texts against 1680 gathered images) the sum over i is split across
programs into fp32 partial sums that torch adds up, so the GPU is not left with 8 programs. A NaN product wins the max (as
``amax`` propagates NaN), so a broken feature still shows as a non-finite loss.

Same interpreter rules as the cross-attention kernel: bf16 upcast after each load when
interpreting, IEEE dot products for fp32 inputs.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _max_sim_fwd(
    A, T, OUT, ARG,
    stride_ai, stride_aq, stride_ad, stride_tt, stride_td,
    NI, NT, NQ, D,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    best = tl.full([BLOCK_I, BLOCK_T], float("-inf"), tl.float32)
    best_q = tl.zeros([BLOCK_I, BLOCK_T], tl.int32)
    for q in range(0, NQ):
        sim = tl.zeros([BLOCK_I, BLOCK_T], tl.float32)
        for start_d in range(0, D, BLOCK_D):
            offs_d = start_d + tl.arange(0, BLOCK_D)
            a = tl.load(A + offs_i[:, None] * stride_ai + q * stride_aq + offs_d[None, :] * stride_ad,
                        mask=(offs_i[:, None] < NI) & (offs_d[None, :] < D), other=0.0)
            t = tl.load(T + offs_t[:, None] * stride_tt + offs_d[None, :] * stride_td,
                        mask=(offs_t[:, None] < NT) & (offs_d[None, :] < D), other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                t = t.to(tl.float32)
            sim += tl.dot(a, tl.trans(t), input_precision=PRECISION)
        # Strictly greater: the first maximal query wins ties, as torch.max does.
        better = (sim > best) | (sim != sim)
        best = tl.where(better, sim, best)
        best_q = tl.where(better, q, best_q)
    out_offs = offs_i[:, None] * NT + offs_t[None, :]
    out_mask = (offs_i[:, None] < NI) & (offs_t[None, :] < NT)
    tl.store(OUT + out_offs, best, mask=out_mask)
    tl.store(ARG + out_offs, best_q, mask=out_mask)


@triton.jit
def _routed_gradient(G, ARG, stride_gi, stride_gt, offs_i, offs_t, NI, NT):
    mask = (offs_i[:, None] < NI) & (offs_t[None, :] < NT)
    grad = tl.load(G + offs_i[:, None] * stride_gi + offs_t[None, :] * stride_gt, mask=mask, other=0.0).to(tl.float32)
    winner = tl.load(ARG + offs_i[:, None] * NT + offs_t[None, :], mask=mask, other=-1)
    return grad, winner


@triton.jit
def _max_sim_bwd_queries(
    G, ARG, T, DA,
    stride_gi, stride_gt, stride_tt, stride_td,
    NI, NT, NQ, D,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    q = tl.program_id(1)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_I, BLOCK_D], tl.float32)
    for start_t in range(0, NT, BLOCK_T):
        offs_t = start_t + tl.arange(0, BLOCK_T)
        grad, winner = _routed_gradient(G, ARG, stride_gi, stride_gt, offs_i, offs_t, NI, NT)
        t = tl.load(T + offs_t[:, None] * stride_tt + offs_d[None, :] * stride_td,
                    mask=(offs_t[:, None] < NT) & (offs_d[None, :] < D), other=0.0)
        if UPCAST:
            t = t.to(tl.float32)
        routed = tl.where(winner == q, grad, 0.0)
        acc += tl.dot(routed.to(t.dtype), t, input_precision=PRECISION)
    # DA is a contiguous (NI, NQ, D) buffer allocated by the wrapper.
    tl.store(DA + (offs_i[:, None] * NQ + q) * D + offs_d[None, :], acc.to(DA.dtype.element_ty),
             mask=(offs_i[:, None] < NI) & (offs_d[None, :] < D))


@triton.jit
def _max_sim_bwd_texts(
    G, ARG, A, DT,
    stride_gi, stride_gt, stride_ai, stride_aq, stride_ad,
    NI, NT, NQ, D, I_PER_SPLIT,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    # I_PER_SPLIT is a multiple of BLOCK_I: each split owns whole row blocks.
    for start_i in range(split * I_PER_SPLIT, tl.minimum(NI, (split + 1) * I_PER_SPLIT), BLOCK_I):
        offs_i = start_i + tl.arange(0, BLOCK_I)
        grad, winner = _routed_gradient(G, ARG, stride_gi, stride_gt, offs_i, offs_t, NI, NT)
        for q in range(0, NQ):
            a = tl.load(A + offs_i[:, None] * stride_ai + q * stride_aq + offs_d[None, :] * stride_ad,
                        mask=(offs_i[:, None] < NI) & (offs_d[None, :] < D), other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
            routed = tl.where(winner == q, grad, 0.0)
            acc += tl.dot(tl.trans(routed.to(a.dtype)), a, input_precision=PRECISION)
    # DT: contiguous (splits, NT, D) fp32 partial sums.
    tl.store(DT + (split * NT + offs_t[:, None]) * D + offs_d[None, :], acc,
             mask=(offs_t[:, None] < NT) & (offs_d[None, :] < D))


# ---- launch wrappers ----------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def gpu_tiles(d: int, dtype: torch.dtype) -> dict:
    """Tile sizes and warps of a GPU launch. Chosen with ``python -m blip2_ds.kernels.compile_check``
    (cubins for sm_80 / sm_90 at the real ITC sizes): with 64-wide feature blocks or 4 warps the
    forward needed 255 registers and spilled, because the compiler keeps a whole text tile across
    the loop over queries; these spill nowhere."""
    if dtype == torch.float32:
        return dict(BLOCK_I=32, BLOCK_T=32, BLOCK_D=max(16, min(32, triton.next_power_of_2(d))), num_warps=4)
    return dict(BLOCK_I=64, BLOCK_T=64, BLOCK_D=max(16, min(32, triton.next_power_of_2(d))), num_warps=8)


def interpreter_tiles(d: int, dtype: torch.dtype) -> dict:
    """The interpreter pays per program and per loop iteration, not per element: the biggest blocks."""
    return dict(BLOCK_I=64, BLOCK_T=64, BLOCK_D=max(16, min(256, triton.next_power_of_2(d))))


def _blocks(d: int, dtype: torch.dtype) -> dict:
    """Launch keywords: tiles (and on a GPU warps and stages), bf16 upcast in the interpreter, dot precision."""
    if _interpreting():
        sizes = interpreter_tiles(d, dtype)
    else:
        sizes = dict(gpu_tiles(d, dtype), num_stages=2)
    return dict(**sizes, UPCAST=_interpreting() and dtype == torch.bfloat16,
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def forward(query_feats: torch.Tensor, text_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(NI, Q, D) x (NT, D) -> fp32 maxima (NI, NT) and int32 argmax (NI, NT)."""
    ni, nq, d = query_feats.shape
    nt = text_feats.shape[0]
    out = torch.empty((ni, nt), device=query_feats.device, dtype=torch.float32)
    arg = torch.empty((ni, nt), device=query_feats.device, dtype=torch.int32)
    blocks = _blocks(d, query_feats.dtype)
    grid = (triton.cdiv(ni, blocks["BLOCK_I"]), triton.cdiv(nt, blocks["BLOCK_T"]))
    _max_sim_fwd[grid](query_feats, text_feats, out, arg, *query_feats.stride(), *text_feats.stride(),
                       ni, nt, nq, d, **blocks)
    return out, arg


def _row_splits(text_programs: int, row_blocks: int, device: torch.device) -> int:
    """How many programs share the sum over rows in the text gradient: enough for ~2 waves of the GPU."""
    if _interpreting() or device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(row_blocks, triton.cdiv(target, text_programs)))


def backward(grad: torch.Tensor, arg: torch.Tensor, query_feats: torch.Tensor, text_feats: torch.Tensor,
             row_splits: int | None = None):
    """Gradients w.r.t. the query and text features; ``row_splits`` forces the split of the text gradient's row sum."""
    ni, nq, d = query_feats.shape
    nt = text_feats.shape[0]
    d_query = torch.empty((ni, nq, d), device=query_feats.device, dtype=query_feats.dtype)
    blocks = _blocks(d, query_feats.dtype)
    d_blocks = triton.cdiv(d, blocks["BLOCK_D"])
    text_blocks = triton.cdiv(nt, blocks["BLOCK_T"])
    row_blocks = triton.cdiv(ni, blocks["BLOCK_I"])
    splits = row_splits or _row_splits(text_blocks * d_blocks, row_blocks, query_feats.device)
    rows_per_split = triton.cdiv(row_blocks, splits) * blocks["BLOCK_I"]
    splits = triton.cdiv(ni, rows_per_split)
    d_text_parts = torch.empty((splits, nt, d), device=text_feats.device, dtype=torch.float32)
    _max_sim_bwd_queries[(triton.cdiv(ni, blocks["BLOCK_I"]), nq, d_blocks)](
        grad, arg, text_feats, d_query, *grad.stride(), *text_feats.stride(), ni, nt, nq, d,
        **blocks)
    _max_sim_bwd_texts[(text_blocks, d_blocks, splits)](
        grad, arg, query_feats, d_text_parts, *grad.stride(), *query_feats.stride(), ni, nt, nq, d, rows_per_split,
        **blocks)
    d_text = d_text_parts[0] if splits == 1 else d_text_parts.sum(0)
    return d_query, d_text.to(text_feats.dtype)
