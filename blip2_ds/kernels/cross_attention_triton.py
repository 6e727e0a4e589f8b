"""Triton cross-attention for few queries into many keys (the Q-Former's 32 queries x 257/677 image tokens).

Forward: one program per (batch, head, block of queries) streams the keys in blocks with an
online softmax and keeps only the row log-sum-exp for backward. Backward: one kernel launched in
two modes that recompute the probabilities tile by tile (cheap at Lq=32) instead of storing them:
one program per (batch, head, block of keys) accumulates dK and dV over the queries, one per
(batch, head, block of queries) accumulates dQ over the keys, so no two programs write the same
output and the result is deterministic (no atomics).

Attention dropout is drawn inside the kernels from a counter-based generator (philox via
``tl.rand``) keyed by a per-call seed and the (batch, head, query, key) position, so backward
regenerates the forward's mask instead of storing it; :func:`dropout_keep_mask` materialises the
same mask for tests.

Numerics: fp32 accumulation everywhere; fp32 inputs use IEEE fp32 dot products (as torch's own
fp32 matmuls, TF32 off). A fully masked query row attends to nothing: output 0, gradients 0.
In Triton's interpreter (CPU tests) bf16 arithmetic is broken, so bf16 operands are upcast after
each load there (see ../shared/notes/triton_on_cpu.md); on a GPU they go to the tensor cores as is.

The launch wrappers take (B, H, L, d) tensors of any strides (the model passes head-split views).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _dropout_keep(seed, bh, offs_m, offs_n, LK, p_drop):
    # Keyed by (seed, batch*head) and the (query, key) position: forward and both backward kernels agree.
    return tl.rand(seed + bh, offs_m[:, None] * LK + offs_n[None, :]) >= p_drop


@triton.jit
def _load_rows(ptr, offs_l, offs_d, stride_l, stride_d, L, D, UPCAST: tl.constexpr):
    tile = tl.load(ptr + offs_l[:, None] * stride_l + offs_d[None, :] * stride_d,
                   mask=(offs_l[:, None] < L) & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _key_valid(MASK, b, stride_mb, stride_mn, offs_n, LK, HAS_MASK: tl.constexpr):
    valid = offs_n < LK
    if HAS_MASK:
        valid = valid & (tl.load(MASK + b * stride_mb + offs_n * stride_mn, mask=offs_n < LK, other=0) != 0)
    return valid


@triton.jit(do_not_specialize=["seed"])
def _cross_attention_fwd(
    Q, K, V, MASK, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn,
    H, LQ, LK, D, qk_scale, p_drop, seed,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # b x batch stride can pass 2**31 elements (large evaluation batches)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, LQ, D, UPCAST)

    # Scores live in the log2 domain (qk_scale includes log2(e)) so the softmax uses exp2.
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, LK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, valid = _key_side(K, V, MASK, b, h, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd,
                                stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mn, LK, D, HAS_MASK, UPCAST)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # A row that has seen only masked keys keeps max -inf: shift by 0 so exp2 gives 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp2(scores - shift[:, None])
        rescale = tl.exp2(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, LK, p_drop)
            probs = tl.where(keep, probs / (1.0 - p_drop), 0.0)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max

    empty = row_sum == 0.0
    out = acc / tl.where(empty, 1.0, row_sum)[:, None]
    # +inf makes backward's exp2(score - lse) exactly 0 on rows that attend to nothing.
    lse = tl.where(empty, float("inf"), row_max + tl.log2(tl.where(empty, 1.0, row_sum)))
    o_ptr = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < LQ) & (offs_d[None, :] < D))
    tl.store(LSE + bh * LQ + offs_m, lse, mask=offs_m < LQ)


@triton.jit
def _tile_gradients(q, k, v, do, lse, delta, valid, offs_m, offs_n, bh, LK, qk_scale, p_drop, seed,
                    DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """For one (queries, keys) tile: the (dropped) probabilities and dS = P * (dP - rowsum(dO * O))."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    probs = tl.where(valid[None, :], tl.exp2(scores - lse[:, None]), 0.0)
    dprobs = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if DROPOUT:
        keep_scale = tl.where(_dropout_keep(seed, bh, offs_m, offs_n, LK, p_drop), 1.0 / (1.0 - p_drop), 0.0)
        dropped = probs * keep_scale
        dprobs = dprobs * keep_scale
    else:
        dropped = probs
    return dropped, probs * (dprobs - delta[:, None])


@triton.jit
def _query_side(Q, DO, LSE, DELTA, b, h, bh, offs_m, offs_d,
                stride_qb, stride_qh, stride_qm, stride_qd, stride_ob, stride_oh, stride_om, stride_od,
                LQ, D, UPCAST: tl.constexpr):
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, LQ, D, UPCAST)
    do = _load_rows(DO + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_om, stride_od, LQ, D, UPCAST)
    lse = tl.load(LSE + bh * LQ + offs_m, mask=offs_m < LQ, other=float("inf"))
    delta = tl.load(DELTA + bh * LQ + offs_m, mask=offs_m < LQ, other=0.0)
    return q, do, lse, delta


@triton.jit
def _key_side(K, V, MASK, b, h, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mn, LK, D,
              HAS_MASK: tl.constexpr, UPCAST: tl.constexpr):
    k = _load_rows(K + b * stride_kb + h * stride_kh, offs_n, offs_d, stride_kn, stride_kd, LK, D, UPCAST)
    v = _load_rows(V + b * stride_vb + h * stride_vh, offs_n, offs_d, stride_vn, stride_vd, LK, D, UPCAST)
    return k, v, _key_valid(MASK, b, stride_mb, stride_mn, offs_n, LK, HAS_MASK)


@triton.jit(do_not_specialize=["seed"])
def _cross_attention_bwd(
    Q, K, V, MASK, DO, LSE, DELTA, DQ, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn,
    H, LQ, LK, D, qk_scale, sm_scale, p_drop, seed,
    FOR_KEYS: tl.constexpr,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """FOR_KEYS: one program per (key block, batch*head) writes dK, dV; else per (query block, batch*head) dQ.
    DQ / DK / DV are contiguous (B, H, L, D) buffers allocated by the wrapper."""
    bh = tl.program_id(1).to(tl.int64)  # b x batch stride can pass 2**31 elements (large evaluation batches)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    if FOR_KEYS:
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k, v, valid = _key_side(K, V, MASK, b, h, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd,
                                stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mn, LK, D, HAS_MASK, UPCAST)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, LQ, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q, do, lse, delta = _query_side(Q, DO, LSE, DELTA, b, h, bh, offs_m, offs_d,
                                            stride_qb, stride_qh, stride_qm, stride_qd,
                                            stride_ob, stride_oh, stride_om, stride_od, LQ, D, UPCAST)
            dropped, dscores = _tile_gradients(q, k, v, do, lse, delta, valid, offs_m, offs_n, bh, LK,
                                               qk_scale, p_drop, seed, DROPOUT, PRECISION)
            dv += tl.dot(tl.trans(dropped.to(do.dtype)), do, input_precision=PRECISION)
            dk += tl.dot(tl.trans(dscores.to(q.dtype)), q, input_precision=PRECISION)
        out_mask = (offs_n[:, None] < LK) & (offs_d[None, :] < D)
        base = (bh * LK + offs_n[:, None]) * D + offs_d[None, :]
        tl.store(DK + base, (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
        tl.store(DV + base, dv.to(DV.dtype.element_ty), mask=out_mask)
    else:
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        q, do, lse, delta = _query_side(Q, DO, LSE, DELTA, b, h, bh, offs_m, offs_d,
                                        stride_qb, stride_qh, stride_qm, stride_qd,
                                        stride_ob, stride_oh, stride_om, stride_od, LQ, D, UPCAST)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, LK, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, v, valid = _key_side(K, V, MASK, b, h, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd,
                                    stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mn, LK, D,
                                    HAS_MASK, UPCAST)
            _, dscores = _tile_gradients(q, k, v, do, lse, delta, valid, offs_m, offs_n, bh, LK,
                                         qk_scale, p_drop, seed, DROPOUT, PRECISION)
            dq += tl.dot(dscores.to(k.dtype), k, input_precision=PRECISION)
        base = (bh * LQ + offs_m[:, None]) * D + offs_d[None, :]
        tl.store(DQ + base, (dq * sm_scale).to(DQ.dtype.element_ty),
                 mask=(offs_m[:, None] < LQ) & (offs_d[None, :] < D))


@triton.jit
def _dropout_mask_kernel(OUT, H, LQ, LK, p_drop, seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # b x batch stride can pass 2**31 elements (large evaluation batches)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    for start_n in range(0, LK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, bh, offs_m, offs_n, LK, p_drop)
        tl.store(OUT + (bh * LQ + offs_m[:, None]) * LK + offs_n[None, :], keep.to(tl.int8),
                 mask=(offs_m[:, None] < LQ) & (offs_n[None, :] < LK))


# ---- launch wrappers ----------------------------------------------------------------------------
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def gpu_tiles(lq: int, lk: int, d: int, dtype: torch.dtype) -> dict:
    """Tile sizes and warps of a GPU launch (``tl.dot`` needs every block dimension >= 16). Checked
    with ``python -m blip2_ds.kernels.compile_check`` (cubins for sm_80 / sm_90, 257 and 677 keys):
    fp32 tiles with 4 warps needed 255 registers and spilled, so fp32 gets 8 warps."""
    block_d = max(16, triton.next_power_of_2(d))
    return dict(BLOCK_M=min(max(16, triton.next_power_of_2(lq)), 64), BLOCK_N=64 if block_d <= 64 else 32,
                BLOCK_D=block_d, num_warps=8)


def interpreter_tiles(lq: int, lk: int, d: int, dtype: torch.dtype) -> dict:
    """The interpreter pays per program and per loop iteration, not per element: the biggest blocks."""
    return dict(BLOCK_M=min(max(16, triton.next_power_of_2(lq)), 64), BLOCK_N=128,
                BLOCK_D=max(16, triton.next_power_of_2(d)))


def _blocks(lq: int, lk: int, d: int, dtype: torch.dtype) -> dict:
    """Launch keywords: tiles (and on a GPU warps and stages), bf16 upcast in the interpreter, dot precision."""
    if _interpreting():
        sizes = interpreter_tiles(lq, lk, d, dtype)
    else:
        sizes = dict(gpu_tiles(lq, lk, d, dtype), num_stages=2)
    return dict(**sizes, UPCAST=_interpreting() and dtype == torch.bfloat16,
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _mask_args(key_mask: torch.Tensor | None, like: torch.Tensor):
    if key_mask is None:
        return like, 0, 0  # never read (HAS_MASK=False)
    mask = key_mask.to(torch.int8)
    return mask, mask.stride(0), mask.stride(1)


def forward(q, k, v, key_mask, dropout_p: float, seed: int):
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, lq), device=q.device, dtype=torch.float32)
    mask, smb, smn = _mask_args(key_mask, q)
    blocks = _blocks(lq, lk, d, q.dtype)
    grid = (triton.cdiv(lq, blocks["BLOCK_M"]), batch * heads)
    _cross_attention_fwd[grid](
        q, k, v, mask, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), smb, smn,
        heads, lq, lk, d, d ** -0.5 * LOG2E, dropout_p, seed,
        HAS_MASK=key_mask is not None, DROPOUT=dropout_p > 0, **blocks,
    )
    return out, lse


def backward(grad_out, q, k, v, key_mask, out, lse, dropout_p: float, seed: int):
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    dq = torch.empty((batch, heads, lq, d), device=q.device, dtype=q.dtype)
    dk = torch.empty((batch, heads, lk, d), device=k.device, dtype=k.dtype)
    dv = torch.empty((batch, heads, lk, d), device=v.device, dtype=v.dtype)
    mask, smb, smn = _mask_args(key_mask, q)
    blocks = _blocks(lq, lk, d, q.dtype)
    common = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), smb, smn,
              heads, lq, lk, d, d ** -0.5 * LOG2E, d ** -0.5, dropout_p, seed)
    flags = dict(HAS_MASK=key_mask is not None, DROPOUT=dropout_p > 0, **blocks)
    for for_keys, blocks_along in ((True, triton.cdiv(lk, blocks["BLOCK_N"])), (False, triton.cdiv(lq, blocks["BLOCK_M"]))):
        _cross_attention_bwd[(blocks_along, batch * heads)](
            q, k, v, mask, grad_out, lse, delta, dq, dk, dv, *common, FOR_KEYS=for_keys, **flags)
    return dq, dk, dv


def dropout_keep_mask(batch: int, heads: int, lq: int, lk: int, dropout_p: float, seed: int,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """The (B, H, Lq, Lk) bool keep-mask the kernels draw for ``seed`` (for tests and references)."""
    out = torch.empty((batch, heads, lq, lk), dtype=torch.int8, device=device)
    _dropout_mask_kernel[(triton.cdiv(lq, 16), batch * heads)](out, heads, lq, lk, dropout_p, seed,
                                                              BLOCK_M=16, BLOCK_N=64)
    return out.bool()
