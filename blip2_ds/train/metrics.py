"""Training metrics: analytic FLOP counts, throughput / MFU, TensorBoard and the progress display.

FLOP convention
---------------
One multiply-add is 2 FLOPs. Only matrix products are counted: every ``nn.Linear`` / ``F.linear``
(``2 * rows * in * out``), the patch-embedding convolution (``2 * patches * 3 * p^2 * width``) and the
two matmuls of every attention (scores ``Q K^T`` and context ``P V``: ``2 * 2 * Lq * Lk * width`` over
all heads). Softmax, LayerNorm, GELU, dropout, residual adds, embeddings and losses are ignored
(well under 1% at real sizes). Attention is counted dense, masked positions included: that is what
``scaled_dot_product_attention`` computes. This is what ``torch.utils.flop_counter.FlopCounterMode``
counts (``mm``/``addmm``/``bmm``/convolution/SDPA), and ``tests/test_metrics.py`` checks the formulas
against it on tiny real modules of this repository.

Training multipliers
--------------------
- trainable layers (Q-Former, projections, heads): forward + backward = 3x forward (the backward
  computes a gradient w.r.t. the input AND one w.r.t. the weight of every matmul, 2x forward);
- the frozen ViT: forward only, under ``no_grad`` (1x);
- the frozen LLM of stage 2: forward, and a backward for the activations only (the soft prompt
  needs its gradient, the frozen weights get none). A linear layer then costs 1x forward in the
  backward (input gradient only: 2x in total), while an attention's score/context matmuls cost 2x
  forward in the backward (dQ, dK, dV and dP all depend on the input: 3x in total) and the LM head
  1x (2x in total). So the LLM is ~2x its forward, slightly more because of attention.

All step counts are per SAMPLE (one image-text pair) and are returned as dicts of named parts
plus ``"total"``; multiply by samples per second to get FLOP/s.
"""
from __future__ import annotations

import datetime
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from blip2_ds.config import QFormerConfig


# ==== model dimensions ===============================================================================
@dataclass(frozen=True)
class VisionDims:
    """Shape of the frozen ViT as it is RUN (BLIP-2 drops the last block: ``depth`` = blocks kept)."""

    width: int
    depth: int
    mlp_dim: int
    tokens: int
    """Tokens per image, class token included (257 for ViT-g/14 at 224 px)."""
    patch: int = 14
    image_size: int = 224
    channels: int = 3
    gated_mlp: bool = False
    """SwiGLU-style MLP (three matmuls, as EVA-02); EVA01 / CLIP ViTs have a plain two-matmul MLP."""

    @classmethod
    def from_tower(cls, tower: Any) -> "VisionDims":
        """Dims of a :class:`blip2_ds.models.vision.FrozenVisionTower` (after its last block was pruned)."""
        enc = tower.encoder
        if tower.kind == "timm":
            blocks = enc.blocks
            mlp = blocks[0].mlp
            gated = hasattr(mlp, "fc1_g")
            mlp_dim = mlp.fc1_g.out_features if gated else mlp.fc1.out_features
            patch = int(enc.patch_embed.patch_size[0])
        else:
            blocks = enc.transformer.resblocks
            mlp_dim, gated = blocks[0].mlp.c_fc.out_features, False
            patch = int(enc.conv1.kernel_size[0])
        return cls(width=tower.width, depth=len(blocks), mlp_dim=mlp_dim, tokens=tower.num_tokens, patch=patch,
                   image_size=tower.image_size, gated_mlp=gated)


EVA_VIT_G = VisionDims(width=1408, depth=39, mlp_dim=6144, tokens=257, patch=14, image_size=224)
"""BLIP-2's EVA ViT-g/14 at 224 px with its last (40th) block dropped."""


@dataclass(frozen=True)
class LLMDims:
    """Shape of a decoder-only LLM (OPT-style: q/k/v/out projections, a two-matmul FFN, an LM head)."""

    hidden: int
    layers: int
    ffn: int
    vocab: int
    heads: int
    """Does not change the FLOPs (kept for reporting)."""

    @classmethod
    def from_hf_config(cls, config: Any) -> "LLMDims":
        """From a transformers OPT config (``hidden_size``, ``num_hidden_layers``, ``ffn_dim`` ...)."""
        ffn = getattr(config, "ffn_dim", None) or getattr(config, "intermediate_size")
        return cls(hidden=config.hidden_size, layers=config.num_hidden_layers, ffn=ffn,
                   vocab=config.vocab_size, heads=config.num_attention_heads)


OPT_2_7B = LLMDims(hidden=2560, layers=32, ffn=10240, vocab=50272, heads=32)


def _vision_dims(vision: VisionDims | Mapping[str, Any]) -> VisionDims:
    return vision if isinstance(vision, VisionDims) else VisionDims(**dict(vision))


def _llm_dims(llm: LLMDims | Mapping[str, Any]) -> LLMDims:
    return llm if isinstance(llm, LLMDims) else LLMDims(**dict(llm))


# ==== FLOP formulas ==================================================================================
def linear_flops(rows: float, d_in: int, d_out: int) -> float:
    """``2 * rows * d_in * d_out``."""
    return 2.0 * rows * d_in * d_out


def attention_matmul_flops(q_len: float, k_len: float, width: int) -> float:
    """Scores and context over all heads: ``2 * (2 * q_len * k_len * width)``."""
    return 4.0 * q_len * k_len * width


def vit_forward_flops(width: int, depth: int, mlp_dim: int, tokens: int, patch: int, image_size: int,
                      channels: int = 3, gated_mlp: bool = False) -> float:
    """Forward FLOPs of a ViT on ONE image (``depth`` = blocks actually run).

    ``patches * 2 * (channels * patch^2) * width`` (patch embedding, a strided convolution)
    ``+ depth * [2 * tokens * width * 3 * width`` (fused qkv)
    ``+ 2 * tokens * width^2`` (attention output projection)
    ``+ 2 * 2 * tokens * width * mlp_dim`` (MLP up and down; 3 matmuls when ``gated_mlp``)
    ``+ 2 * 2 * tokens^2 * width]`` (attention scores and context).
    """
    patches = (image_size // patch) ** 2
    embed = 2.0 * patches * channels * patch * patch * width
    mlp = (3 if gated_mlp else 2) * linear_flops(tokens, width, mlp_dim)
    block = (linear_flops(tokens, width, 3 * width) + linear_flops(tokens, width, width) + mlp
             + attention_matmul_flops(tokens, tokens, width))
    return embed + depth * block


def _vit_flops(vision: VisionDims) -> float:
    return vit_forward_flops(vision.width, vision.depth, vision.mlp_dim, vision.tokens, vision.patch,
                             vision.image_size, vision.channels, vision.gated_mlp)


def _num_cross_layers(cfg: QFormerConfig) -> int:
    return len(range(0, cfg.num_layers, cfg.cross_attention_freq))


def _image_kv_flops(cfg: QFormerConfig, image_tokens: int) -> float:
    """Keys and values of one image in every cross-attention layer (``QFormer.image_kv``)."""
    return _num_cross_layers(cfg) * 2 * linear_flops(image_tokens, cfg.vision_width, cfg.hidden_size)


def _qformer_pass_flops(cfg: QFormerConfig, rows: int, keys: int, query_rows: int, image_tokens: int) -> float:
    """One Q-Former pass for one sample, excluding the image K/V (computed once per step).

    ``rows``: rows of this pass (queries + text); ``keys``: self-attention keys (rows, plus the
    cached query keys for ITG); ``query_rows``: rows that go through cross-attention.
    Per layer: q/k/v/out projections of the rows (``4 * 2 * rows * H^2``), self-attention
    matmuls (``4 * rows * keys * H``), the feed-forward (``2 * 2 * rows * H * F``, query rows
    through ``query_ffn``, text rows through ``text_ffn``); in cross-attention layers also the
    query and output projections of the query rows (``2 * 2 * query_rows * H^2``) and their
    attention into the image tokens (``4 * query_rows * image_tokens * H``).
    """
    h, f = cfg.hidden_size, cfg.intermediate_size
    per_layer = (4 * linear_flops(rows, h, h) + attention_matmul_flops(rows, keys, h)
                 + 2 * linear_flops(rows, h, f))
    per_cross = (2 * linear_flops(query_rows, h, h) + attention_matmul_flops(query_rows, image_tokens, h)
                 if query_rows else 0.0)
    return cfg.num_layers * per_layer + _num_cross_layers(cfg) * per_cross


def _finish(parts: dict[str, float]) -> dict[str, float]:
    parts["total"] = sum(parts.values())
    return parts


def stage1_step_flops(qcfg: QFormerConfig, vision: VisionDims | Mapping[str, Any], text_len: int,
                      predicting_tokens: float, global_batch: int | None = None) -> dict[str, float]:
    """FLOPs of one stage-1 training step per SAMPLE, as :class:`~blip2_ds.models.stage1.Stage1Model` runs it.

    ``text_len``: padded text length T (every pass computes the padding too);
    ``predicting_tokens``: mean non-pad next-token targets per sample (the LM head only runs there);
    ``global_batch``: samples over all ranks; when given, the ITC similarity matmuls (local rows
    against the gathered batch) are counted too (negligible at real sizes).

    With Q queries, H hidden, V vocabulary, E embed_dim, N image tokens (forward FLOPs):

    - ``vit``: the frozen ViT on the sample's image (1x, no backward);
    - ``image_kv``: cross-attention K/V of the local image AND of its ITM negative image
      (``2 * C * 2 * 2 * N * vision_width * H``, C = layers with cross-attention);
    - ``image_pass``: Q query rows, Q keys, + cross-attention; + ``vision_proj`` (``2 * Q * H * E``);
    - ``text_pass``: T text rows, T keys; + ``text_proj`` on [CLS] (``2 * H * E``);
    - ``itm_pass``: 3 pairs of Q + T rows (queries cross-attend); + ``itm_head`` (``3 * 2 * Q * H * 2``);
    - ``itg_pass``: T text rows attending to Q cached query keys + T text keys;
      + LM head at the predicting positions (``P * (2 * H^2 + 2 * H * V)``);
    - ``itc``: ``2 * 2 * Q * E * global_batch`` (image->text and text->image similarities);
    - ``qformer_train`` = 3 x the sum of the trainable parts (forward + backward);
    - ``total`` = ``vit + qformer_train``.
    """
    v = _vision_dims(vision)
    c = qcfg
    q, t, h, n = c.num_query_tokens, text_len, c.hidden_size, v.tokens
    fwd = {
        "image_kv": 2 * _image_kv_flops(c, n),
        "image_pass": _qformer_pass_flops(c, q, q, q, n) + linear_flops(q, h, c.embed_dim),
        "text_pass": _qformer_pass_flops(c, t, t, 0, n) + linear_flops(1, h, c.embed_dim),
        "itm_pass": 3 * (_qformer_pass_flops(c, q + t, q + t, q, n) + linear_flops(q, h, 2)),
        "itg_pass": _qformer_pass_flops(c, t, q + t, 0, n)
        + predicting_tokens * (linear_flops(1, h, h) + linear_flops(1, h, c.vocab_size)),
        "itc": 2 * 2.0 * q * c.embed_dim * global_batch if global_batch else 0.0,
    }
    qformer_forward = sum(fwd.values())
    out = {"vit": _vit_flops(v), **fwd, "qformer_forward": qformer_forward, "qformer_train": 3 * qformer_forward}
    out["total"] = out["vit"] + out["qformer_train"]
    return out


def llm_forward_flops(llm: LLMDims | Mapping[str, Any], seq_len: int, logit_positions: int) -> dict[str, float]:
    """Forward FLOPs of a decoder-only LLM on one sequence: ``{"linear", "attention", "lm_head"}``.

    Per layer: q/k/v/out projections ``4 * 2 * S * D^2``, FFN ``2 * 2 * S * D * F``, attention
    ``4 * S^2 * D`` (dense: the causal half is computed too). LM head: ``2 * logit_positions * D * V``.
    """
    m = _llm_dims(llm)
    s, d = seq_len, m.hidden
    return {
        "linear": m.layers * (4 * linear_flops(s, d, d) + 2 * linear_flops(s, d, m.ffn)),
        "attention": m.layers * attention_matmul_flops(s, s, d),
        "lm_head": linear_flops(logit_positions, d, m.vocab),
    }


def stage2_step_flops(qcfg: QFormerConfig, vision: VisionDims | Mapping[str, Any], llm: LLMDims | Mapping[str, Any],
                      text_len: int, logit_positions: int | None = None) -> dict[str, float]:
    """FLOPs of one stage-2 training step per SAMPLE (OPT-style decoder-only LLM).

    ``text_len``: padded LLM text length T; the LLM runs on S = Q + T positions;
    ``logit_positions``: positions where vocabulary logits are computed (default T + 1: what
    :class:`~blip2_ds.models.stage2.Stage2Model` asks OPT for with ``logits_to_keep``).

    - ``vit``: frozen ViT forward (1x);
    - ``qformer_forward``: image K/V + the queries-only pass + ``llm_proj`` (``2 * Q * H * D``);
      ``qformer_train`` = 3x it;
    - ``llm_forward``: :func:`llm_forward_flops` on S positions;
    - ``llm_backward``: activation gradients only: linears and LM head 1x, attention 2x;
    - ``total`` = ``vit + qformer_train + llm_forward + llm_backward``.
    """
    v, m = _vision_dims(vision), _llm_dims(llm)
    q, n = qcfg.num_query_tokens, v.tokens
    qformer_forward = (_image_kv_flops(qcfg, n) + _qformer_pass_flops(qcfg, q, q, q, n)
                       + linear_flops(q, qcfg.hidden_size, m.hidden))
    llm_parts = llm_forward_flops(m, q + text_len, text_len + 1 if logit_positions is None else logit_positions)
    out = {
        "vit": _vit_flops(v),
        "qformer_forward": qformer_forward,
        "qformer_train": 3 * qformer_forward,
        "llm_forward": sum(llm_parts.values()),
        "llm_backward": llm_parts["linear"] + 2 * llm_parts["attention"] + llm_parts["lm_head"],
    }
    out["total"] = out["vit"] + out["qformer_train"] + out["llm_forward"] + out["llm_backward"]
    return out


# ==== achieved peak ==================================================================================
CUDA_RAMP_SECONDS = 0.3
"""How long the peak measurement runs products before timing, and at least how long it times them."""


def measure_matmul_tflops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, size: int | None = None,
                          iters: int | None = None) -> float:
    """Achieved TFLOP/s of a square ``size x size`` matmul on ``device`` (the MFU denominator).

    Measured in the same run, on the same chip, so that MFU compares with what this device actually
    sustains (its clocks, power cap, MIG slice) rather than a datasheet number. Defaults: CUDA
    ``size=4096``, products for 0.3 s first (an idle GPU's clocks take tens of ms to ramp up: a short
    warm-up would understate the peak and overstate MFU), then at least ``iters=50`` and 0.3 s of them
    timed with CUDA events; CPU: fp32 (bf16 matmuls are emulated on many CPUs), ``size=1024``,
    ``iters=5`` after 3 warm-up products (well under a second).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if not cuda:
        dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    size = size or (4096 if cuda else 1024)  # smaller CPU products run far below the CPU's matmul peak
    iters = iters or (50 if cuda else 5)
    generator = torch.Generator(device=device).manual_seed(0)  # never touch the run's RNG (exact resume)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    if cuda:
        warm, products, t0 = CUDA_RAMP_SECONDS, 3, time.perf_counter()
        while time.perf_counter() - t0 < warm:
            for _ in range(10):
                torch.mm(a, b, out=out)
            torch.cuda.synchronize(device)
            products += 10
        iters = max(iters, int(warm / ((time.perf_counter() - t0) / products)))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        seconds = time.perf_counter() - t0
    return 2.0 * size ** 3 * iters / max(seconds, 1e-12) / 1e12


# ==== throughput =====================================================================================
def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """CUDA: ``torch.cuda.max_memory_reserved``; otherwise the process's peak RSS (``getrusage``)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_reserved(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def alloc_retries(device: torch.device | str | None = None) -> int | None:
    """Caching-allocator retries (a full cache flush after a failed cudaMalloc: memory pressure); None off CUDA."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))


class Throughput:
    """Per-step wall time, data-wait time and samples of THIS rank over a window of steps.

    Use in the loop (times from ``clock``, default ``time.perf_counter``)::

        tp.start()                      # before asking for the first batch
        for batch in loader:
            tp.data_ready()             # the batch is here: the time since the last step end is data wait
            ...forward / backward / step...
            tp.step_done(local_batch)   # samples of this rank in the step
            if step % log_every == 0:
                metrics_logger.log(step, {**losses, **tp.summary()})   # summary() resets the window

    or feed measured numbers with :meth:`record`. A step is the time from the end of the previous
    step to the end of this one, data wait included. On CUDA, time stamps are host times: take them
    after something that synchronises (e.g. the loss ``.item()`` at log time), or average over a
    window long enough that the asynchrony evens out.

    ``flops_per_sample``: e.g. ``stage1_step_flops(...)["total"]``; ``peak_tflops``: per device,
    e.g. :func:`measure_matmul_tflops`; without them TFLOP/s and MFU are None.
    """

    def __init__(self, flops_per_sample: float | None = None, world_size: int = 1, peak_tflops: float | None = None,
                 device: torch.device | str | None = None, clock: Callable[[], float] = time.perf_counter):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.flops_per_sample = flops_per_sample
        self.world_size = world_size
        self.peak_tflops = peak_tflops
        self.device = torch.device(device) if device is not None else None
        self.clock = clock
        self._last_end: float | None = None
        self._pending_wait = 0.0
        self.reset()

    def reset(self) -> None:
        """Start a new window (the time mark of the last step end is kept)."""
        self.steps = 0
        self.samples = 0
        self.step_time = 0.0
        self.data_wait = 0.0
        self.gc_time = 0.0

    def start(self) -> None:
        """Mark the start of the first step (before the first batch is requested)."""
        self._last_end = self.clock()
        self._pending_wait = 0.0

    def data_ready(self) -> None:
        """The next batch arrived: the time since the previous step ended was spent waiting for data."""
        now = self.clock()
        if self._last_end is None:
            self._last_end = now
        self._pending_wait = now - self._last_end

    def step_done(self, samples: int) -> None:
        """The step finished; ``samples`` = samples this rank processed in it."""
        now = self.clock()
        if self._last_end is None:
            raise RuntimeError("Throughput.step_done() before start() / data_ready()")
        self.record(now - self._last_end, self._pending_wait, samples)
        self._last_end = now
        self._pending_wait = 0.0

    def record(self, step_time: float, data_wait: float, samples: int, gc_time: float = 0.0) -> None:
        """Add one step measured elsewhere: wall time (data wait included), data wait, local samples, and
        the time spent in Python's garbage collection (train/garbage.py's ``CollectionClock``)."""
        self.steps += 1
        self.samples += samples
        self.step_time += step_time
        self.data_wait += data_wait
        self.gc_time += gc_time

    def summary(self, reset: bool = True) -> dict[str, float | int | None]:
        """Metrics of the window (keys as :data:`TAGS` knows them); starts a new window unless ``reset=False``.

        ``samples_per_s`` is global (this rank's rate x world size: every rank gets the same batch
        size), ``samples_per_s_per_gpu`` this rank's; ``tflops_per_gpu`` = flops_per_sample x
        local samples / time; ``mfu`` = tflops_per_gpu / peak_tflops; ``peak_memory_gb`` in GiB.
        """
        elapsed = self.step_time
        per_gpu = self.samples / elapsed if elapsed > 0 else 0.0
        tflops = self.flops_per_sample * per_gpu / 1e12 if self.flops_per_sample is not None else None
        out: dict[str, float | int | None] = {
            "samples_per_s": per_gpu * self.world_size,
            "samples_per_s_per_gpu": per_gpu,
            "data_wait_share": self.data_wait / elapsed if elapsed > 0 else 0.0,
            "gc_share": self.gc_time / elapsed if elapsed > 0 else 0.0,
            "step_time_s": elapsed / self.steps if self.steps else 0.0,
            "tflops_per_gpu": tflops,
            "mfu": tflops / self.peak_tflops if tflops is not None and self.peak_tflops else None,
            "peak_memory_gb": peak_memory_bytes(self.device) / 2 ** 30,
            "alloc_retries": alloc_retries(self.device),
        }
        if reset:
            self.reset()
        return out


# ==== TensorBoard + progress =========================================================================
TAGS: dict[str, str] = {
    "loss": "loss/total",
    "loss_total": "loss/total",
    "loss_itc": "loss/itc",
    "loss_itm": "loss/itm",
    "loss_itg": "loss/itg",
    "loss_lm": "loss/lm",
    "itm_accuracy": "train/itm_accuracy",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "temperature": "train/temperature",
    "loss_scale": "train/loss_scale",
    "skipped_steps": "train/skipped_steps",
    "samples_per_s": "perf/samples_per_s",
    "samples_per_s_per_gpu": "perf/samples_per_s_per_gpu",
    "data_wait_share": "perf/data_wait_share",
    "gc_share": "perf/gc_share",
    "data_wait_share_worst_rank": "perf/data_wait_share_worst_rank",
    "gc_share_worst_rank": "perf/gc_share_worst_rank",
    "step_time_s": "perf/step_time_s",
    "tflops_per_gpu": "perf/tflops_per_gpu",
    "mfu": "perf/mfu",
    "peak_memory_gb": "perf/peak_memory_gb",
    "alloc_retries": "perf/alloc_retries",
    "llm_pad_share": "perf/llm_pad_share",
    "skipped_samples": "data/skipped",
}
"""Metric name -> TensorBoard tag. Names with a ``/`` are tags already; a dict value (e.g.
``{"skipped_samples": {"decode_error": 3}}``) becomes one scalar per key (``data/skipped/decode_error``)."""

# Short names of the log line, in order.
_LINE_FIELDS = (("loss/total", "loss"), ("loss/itc", "itc"), ("loss/itm", "itm"), ("loss/itg", "itg"),
                ("loss/lm", "lm"))


def _plain(value: Any) -> Any:
    """Config values YAML's safe dumper can write (tuples -> lists, other objects -> str)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item()
    return float(value)


def format_eta(seconds: float | None) -> str:
    """``H:MM:SS`` (``?`` when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


class MetricsLogger:
    """Rank 0: TensorBoard scalars under :data:`TAGS`, the config as text, and a progress display.

    The display is a tqdm bar (with ETA) when ``stream`` (stdout by default) is a terminal, and
    otherwise one plain line per :meth:`log` call, e.g.
    ``step 120/1000 | loss 3.21 | itc 1.02 | itm 0.55 | itg 1.64 | lr 1.00e-04 | 45.2 samples/s | mfu 38.1% | eta 0:12:31``.
    Other ranks do nothing: no writer, no files, no output.
    """

    def __init__(self, log_dir: str | os.PathLike, rank: int, total_steps: int, config_dict: Mapping[str, Any] | None,
                 enabled_tensorboard: bool = True, start_step: int = 0, stream: Any = None,
                 use_tqdm: bool | None = None, clock: Callable[[], float] = time.monotonic):
        self.rank = rank
        self.active = rank == 0
        self.total_steps = total_steps
        self.clock = clock
        self.stream = stream if stream is not None else sys.stdout
        self.writer = None
        self.bar = None
        self._first: tuple[int, float] = (start_step, clock())
        self._seen_log = False
        if not self.active:
            return
        if enabled_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run rewrites the steps after its checkpoint: TensorBoard drops the interrupted run's copies.
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step else None)
            if config_dict is not None:
                self.writer.add_text("config", self.config_markdown(config_dict), global_step=start_step)
                self.writer.flush()
        if use_tqdm is None:
            isatty = getattr(self.stream, "isatty", None)
            use_tqdm = bool(isatty and isatty())
        if use_tqdm:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, file=self.stream, dynamic_ncols=True,
                            unit="step", desc="train")

    @staticmethod
    def config_markdown(config_dict: Mapping[str, Any]) -> str:
        """The config as YAML in a markdown code block (TensorBoard renders text as markdown)."""
        import yaml

        text = yaml.safe_dump(_plain(config_dict), sort_keys=False, default_flow_style=False)
        return "```yaml\n" + text + "```"

    @staticmethod
    def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
        """Metric dict -> {tag: float}, None values dropped, nested dicts flattened."""
        out: dict[str, float] = {}
        for name, value in metrics.items():
            tag = TAGS.get(name, name)
            if isinstance(value, Mapping):
                for sub, sub_value in value.items():
                    number = _number(sub_value)
                    if number is not None:
                        out[f"{tag}/{sub}"] = number
                continue
            number = _number(value)
            if number is not None:
                out[tag] = number
        return out

    def eta_seconds(self, step: int, now: float | None = None) -> float | None:
        """Remaining time at the mean rate since the first logged step (before it: since construction)."""
        now = self.clock() if now is None else now
        first_step, first_time = self._first
        done = step - first_step
        if done <= 0:
            return None
        return (now - first_time) / done * max(self.total_steps - step, 0)

    def format_line(self, step: int, scalars: Mapping[str, float], eta: float | None) -> str:
        """The plain progress line (``scalars`` by tag, as :meth:`scalars` returns them)."""
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{short} {scalars[tag]:.4g}" for tag, short in _LINE_FIELDS if tag in scalars]
        if "train/lr" in scalars:
            parts.append(f"lr {scalars['train/lr']:.2e}")
        if "perf/samples_per_s" in scalars:
            parts.append(f"{scalars['perf/samples_per_s']:.1f} samples/s")
        if "perf/mfu" in scalars:
            parts.append(f"mfu {100 * scalars['perf/mfu']:.1f}%")
        parts.append(f"eta {format_eta(eta)}")
        return " | ".join(parts)

    def log(self, step: int, metrics: Mapping[str, Any]) -> str | None:
        """Write the metrics' scalars at ``step`` and update the display; returns the plain line (rank 0)."""
        if not self.active:
            return None
        scalars = self.scalars(metrics)
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, global_step=step)
        now = self.clock()
        eta = self.eta_seconds(step, now)
        line = self.format_line(step, scalars, eta)
        if self.bar is not None:
            self.bar.update(max(step - self.bar.n, 0))
            # tqdm shows the step count and the ETA itself.
            self.bar.set_postfix_str(" | ".join(line.split(" | ")[1:-1]), refresh=True)
        else:
            print(line, file=self.stream, flush=True)
        if not self._seen_log:
            # The first ETA uses the time since construction (start-up included); later ones the
            # mean rate since this first logged step, which excludes start-up.
            self._seen_log = True
            self._first = (step, now)
        return line

    def log_eval(self, step: int, metrics: Mapping[str, Any], images: Any = None,
                 captions: Sequence[tuple[str, str]] = ()) -> str | None:
        """Periodic-evaluation scalars under ``eval/``, optionally (N, 3, H, W) images in [0, 1] with
        their (generated, reference) captions; one plain line. Rank 0 only."""
        if not self.active:
            return None
        scalars = {f"eval/{name}": value for name, value in self.scalars(metrics).items()}
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, global_step=step)
            if images is not None:
                self.writer.add_images("eval/images", images, global_step=step)
            if captions:
                rows = "\n".join(f"| {i} | {generated} | {reference} |" for i, (generated, reference) in enumerate(captions))
                self.writer.add_text("eval/captions", "| image | generated | reference |\n|---|---|---|\n" + rows,
                                     global_step=step)
            self.writer.flush()
        line = f"eval at step {step}: " + ", ".join(f"{tag[5:]} {value:.4g}" for tag, value in scalars.items())
        print(line, file=self.stream if self.bar is None else sys.stderr, flush=True)
        return line

    def log_checkpoint(self, step: int, seconds: float, size_bytes: int, time_share: float) -> str | None:
        """A saved checkpoint: ``checkpoint/save_seconds``, ``checkpoint/size_gb`` and
        ``checkpoint/time_share`` (the save's share of the wall time since the previous save ended:
        what saving costs the run, and what an asynchronous save could give back), and one line. Rank 0 only."""
        if not self.active:
            return None
        scalars = {"checkpoint/save_seconds": seconds, "checkpoint/size_gb": size_bytes / 1e9,
                   "checkpoint/time_share": time_share}
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, global_step=step)
        line = (f"checkpoint at step {step}: {size_bytes / 1e9:.3g} GB in {seconds:.3g} s "
                f"({100 * time_share:.2g}% of the time since the previous save or the start)")
        print(line, file=self.stream if self.bar is None else sys.stderr, flush=True)
        return line

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file and the bar (safe to call twice)."""
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
