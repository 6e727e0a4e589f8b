"""The BERT-style Q-Former, as BLIP-2 builds it.

- learned queries enter as ``query_embeds``; text enters as token ids and gets word +
  absolute position embeddings (positions start at 0 for text; queries get none);
  [queries; text] share one embedding LayerNorm and every self-attention;
- cross-attention into the frozen image features sits in layers ``i % cross_attention_freq == 0``
  and is applied to the query rows only;
- the query rows and the text rows have separate feed-forward blocks;
- the LM head is BERT's prediction head with its decoder tied to the word embeddings.

The image side of every cross-attention (its keys and values) depends only on the image
features, so it is computed once per step by :meth:`QFormer.image_kv` and shared by all passes.
Likewise the queries' self-attention keys/values from the image pass can be reused by a
text-only pass (:class:`QueryCache`): that is how the ITG pass sees the queries without
recomputing them, exactly as the original does with ``past_key_values``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from blip2_ds.config import QFormerConfig
from blip2_ds.kernels import check_backend
from blip2_ds.kernels.cross_attention import cross_attention


@dataclass
class KeyValue:
    """Keys and values split into heads: (B, heads, L, head_dim) each."""

    key: torch.Tensor
    value: torch.Tensor

    def index(self, rows: torch.Tensor | slice) -> "KeyValue":
        return KeyValue(self.key[rows], self.value[rows])

    @staticmethod
    def cat(parts: list["KeyValue"], dim: int = 0) -> "KeyValue":
        return KeyValue(torch.cat([p.key for p in parts], dim), torch.cat([p.value for p in parts], dim))


ImageKV = list["KeyValue | None"]
"""Per layer: the cross-attention keys/values of the image features (None in layers without)."""

QueryCache = list[KeyValue]
"""Per layer: the self-attention keys/values of the query rows from an image pass."""


class Attention(nn.Module):
    """Multi-head attention followed by BERT's output block (dense, dropout, residual LayerNorm)."""

    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.attention_dropout = cfg.attention_dropout
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def project_kv(self, states: torch.Tensor) -> KeyValue:
        return KeyValue(self._split_heads(self.key(states)), self._split_heads(self.value(states)))

    def _dropout_p(self) -> float:
        return self.attention_dropout if self.training else 0.0

    def attend(self, query: torch.Tensor, kv: KeyValue, mask: torch.Tensor | None) -> torch.Tensor:
        return F.scaled_dot_product_attention(query, kv.key, kv.value, attn_mask=mask, dropout_p=self._dropout_p())

    def forward(self, hidden: torch.Tensor, kv: KeyValue, mask: torch.Tensor | None = None) -> torch.Tensor:
        context = self.attend(self._split_heads(self.query(hidden)), kv, mask)
        context = context.transpose(1, 2).flatten(2)
        return self.norm(self.dropout(self.out(context)) + hidden)


class CrossAttention(Attention):
    """The query rows attending to the image tokens, through :func:`blip2_ds.kernels.cross_attention.cross_attention`.

    ``kernels`` (auto / triton / torch) picks the fused Triton kernel or SDPA; ``mask`` here is an
    optional (B, Lk) key padding mask (True = attend), not a full attention mask.
    """

    def __init__(self, cfg: QFormerConfig, kv_width: int, kernels: str = "auto"):
        super().__init__(cfg, kv_width)
        self.kernels = kernels

    def attend(self, query: torch.Tensor, kv: KeyValue, mask: torch.Tensor | None) -> torch.Tensor:
        return cross_attention(query, kv.key, kv.value, mask, self._dropout_p(), backend=self.kernels)


class FeedForward(nn.Module):
    """BERT's intermediate + output block: up, GELU, down, dropout, residual LayerNorm."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dropout(self.down(F.gelu(self.up(hidden)))) + hidden)


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, has_cross_attention: bool, with_text: bool, kernels: str = "auto"):
        super().__init__()
        self.self_attn = Attention(cfg, cfg.hidden_size)
        self.cross_attn = CrossAttention(cfg, cfg.vision_width, kernels) if has_cross_attention else None
        self.query_ffn = FeedForward(cfg)
        self.text_ffn = FeedForward(cfg) if with_text else None

    def forward(
        self,
        hidden: torch.Tensor,
        num_queries: int,
        self_mask: torch.Tensor | None,
        image_kv: KeyValue | None,
        query_cache: KeyValue | None,
    ) -> tuple[torch.Tensor, KeyValue]:
        kv = self.self_attn.project_kv(hidden)
        keys = kv if query_cache is None else KeyValue.cat([query_cache, kv], dim=2)
        attended = self.self_attn(hidden, keys, self_mask)
        outputs = []
        if num_queries:
            queries = attended[:, :num_queries]
            if self.cross_attn is not None:
                if image_kv is None:
                    raise ValueError("query rows need image features: pass image_kv from QFormer.image_kv().")
                queries = self.cross_attn(queries, image_kv)
            outputs.append(self.query_ffn(queries))
        if attended.shape[1] > num_queries:
            if self.text_ffn is None:
                raise ValueError("this Q-Former was built without text parts (stage 2); it takes queries only.")
            outputs.append(self.text_ffn(attended[:, num_queries:]))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return out, kv


class LMHead(nn.Module):
    """BERT's prediction head; the decoder weight is the word embedding matrix (tied)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(F.gelu(self.dense(hidden)))
        return F.linear(hidden, word_embeddings, self.bias)


class QFormer(nn.Module):
    """The Q-Former body. ``with_text=False`` drops the text parts (stage 2).

    ``kernels`` (auto / triton / torch, see :mod:`blip2_ds.kernels`) picks the cross-attention path.
    """

    def __init__(self, cfg: QFormerConfig, with_text: bool = True, kernels: str = "auto"):
        super().__init__()
        cfg.validate()
        check_backend(kernels)
        self.cfg = cfg
        self.with_text = with_text
        if with_text:
            self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.embed_dropout = nn.Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, i % cfg.cross_attention_freq == 0, with_text, kernels) for i in range(cfg.num_layers)
        )
        if with_text:
            self.lm_head = LMHead(cfg)
        self.checkpoint_layers = False
        """Activation checkpointing: in training, keep only each layer's inputs and recompute the layer in
        backward (same values and dropout masks: the RNG state is replayed), trading ~1/3 more Q-Former
        compute for most of its activation memory. The image K/V (computed once per step) stays saved."""

    def embed(self, query_embeds: torch.Tensor | None, text_ids: torch.Tensor | None) -> torch.Tensor:
        parts = []
        if query_embeds is not None:
            parts.append(query_embeds)
        if text_ids is not None:
            if not self.with_text:
                raise ValueError("this Q-Former was built without text parts (stage 2); it takes queries only.")
            positions = torch.arange(text_ids.shape[1], device=text_ids.device)
            parts.append(self.word_embeddings(text_ids) + self.position_embeddings(positions))
        if not parts:
            raise ValueError("QFormer needs query_embeds, text_ids or both.")
        embeddings = parts[0] if len(parts) == 1 else torch.cat([parts[0].to(parts[1].dtype), parts[1]], dim=1)
        return self.embed_dropout(self.embed_norm(embeddings))

    def image_kv(self, image_states: torch.Tensor) -> ImageKV:
        """Cross-attention keys/values of (already ``ln_vision``-normalised) image features."""
        out: ImageKV = []
        for layer in self.layers:
            if layer.cross_attn is None:
                out.append(None)
            else:
                out.append(layer.cross_attn.project_kv(image_states.to(layer.cross_attn.key.weight.dtype)))
        return out

    def forward(
        self,
        query_embeds: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
        self_mask: torch.Tensor | None = None,
        image_kv: ImageKV | None = None,
        query_cache: QueryCache | None = None,
        return_query_cache: bool = False,
    ) -> tuple[torch.Tensor, QueryCache | None]:
        """Run [queries; text] through every layer.

        ``self_mask``: (B, 1, rows, keys) bool from :mod:`blip2_ds.models.masks` (None = no mask).
        ``query_cache``: query self-attention keys/values of an earlier image pass, prepended to
        this pass's keys (this pass then has text rows only).
        Returns the last hidden states and, if ``return_query_cache``, this pass's self-attention
        keys/values (meaningful when the pass has query rows only).
        """
        num_queries = 0 if query_embeds is None else query_embeds.shape[1]
        hidden = self.embed(query_embeds, text_ids)
        cache: QueryCache = []
        recompute = self.checkpoint_layers and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            inputs = (hidden, num_queries, self_mask, None if image_kv is None else image_kv[i],
                      None if query_cache is None else query_cache[i])
            if recompute:
                hidden, kv = torch.utils.checkpoint.checkpoint(layer, *inputs, use_reentrant=False)
            else:
                hidden, kv = layer(*inputs)
            if return_query_cache:
                cache.append(kv)
        return hidden, (cache if return_query_cache else None)

    def lm_logits(self, text_hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(text_hidden, self.word_embeddings.weight)


def init_weights(module: nn.Module, std: float) -> None:
    """BERT's init: normal(0, std) for linear and embedding weights, zero biases, unit LayerNorms."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, std=std)
            if sub.padding_idx is not None:
                with torch.no_grad():
                    sub.weight[sub.padding_idx].zero_()
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
        elif isinstance(sub, LMHead):
            nn.init.zeros_(sub.bias)
