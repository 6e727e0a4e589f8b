"""The baseline: one stage-1 step as the original code (LAVIS ``Blip2Qformer.forward``) runs it.

Same modules and weights as :class:`~blip2_ds.models.stage1.Stage1Model`, so that the two steps
compute the same losses (ITC and ITG equal; ITM from a different draw of the same distribution),
but with the original's choices, each of which this project replaced:

- attention written out (``softmax(q k^T / sqrt(d)) v`` with explicit dropout), no fused kernel,
  for the self-attention and the cross-attention (:func:`eager_attention`), and in the frozen ViT
  (:func:`eager_vision_attention`: the original's ``eva_vit.py`` and ``clip_vit.py`` write it out);
- the captions tokenized in the forward of every step (LAVIS's ``Blip2Qformer.forward`` /
  ``Blip2OPT.forward`` call their tokenizer on the batch's strings), on the trainer's critical path;
  this project's data workers do it (:func:`original_text_tokens`, :func:`original_opt_text`);
- the cross-attention keys/values of the image features recomputed in every pass that uses them:
  the image pass and the ITM pass over ``[images; negative images; images]`` (3B images);
- ITC over the ``(B, BW, Q)`` query-text similarity tensor, materialised in both directions;
- vocabulary logits of the ITG pass at every text position, padding included;
- negatives drawn one sample at a time, ``torch.multinomial(...).item()`` per row (a host sync each);
- the ``ln_vision``-normalised image features of every rank gathered WITH gradient for the
  negatives (``all_gather_with_grad(image_embeds)``), the gradient all-reduced again in backward;
- fp32 weights under autocast (the original: fp16 autocast with a loss scaler; here bf16, which
  needs none), torch's DistributedDataParallel over several ranks and torch's AdamW with its
  defaults, as the original's runner builds them (no gradient clipping).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from blip2_ds import distributed
from blip2_ds.models import masks
from blip2_ds.models.qformer import Attention, CrossAttention, KeyValue
from blip2_ds.models.stage1 import Stage1Model
from blip2_ds.objectives import at_least_fp32, itg, loss_range


def plain_attention(query: torch.Tensor, kv: KeyValue, mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """BERT's attention as the original writes it. ``mask``: bool, True = attend; (B, 1, Lq, Lk) or a
    (B, Lk) key padding mask."""
    scores = query @ kv.key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    if mask is not None:
        if mask.dim() == 2:
            mask = mask[:, None, None, :]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = F.dropout(scores.softmax(dim=-1), p=dropout_p)
    return probs @ kv.value


@contextlib.contextmanager
def eager_attention():
    """Within the context, every Q-Former attention (self and cross) runs :func:`plain_attention`."""
    originals = Attention.attend, CrossAttention.attend

    def attend(self, query, kv, mask):
        return plain_attention(query, kv, mask, self._dropout_p())

    Attention.attend = CrossAttention.attend = attend
    try:
        yield
    finally:
        Attention.attend, CrossAttention.attend = originals


def plain_self_attention(mha: torch.nn.MultiheadAttention, x: torch.Tensor,
                         attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mha(x, x, x)[0]`` (an open_clip block's attention) written out: one input projection,
    ``softmax(q k^T / sqrt(d) + mask) v`` per head, the output projection. Eval only (no dropout)."""
    tokens = x if mha.batch_first else x.transpose(0, 1)
    batch, length, width = tokens.shape
    heads = mha.num_heads
    q, k, v = F.linear(tokens, mha.in_proj_weight, mha.in_proj_bias).view(
        batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    if attn_mask is not None:
        scores = scores + attn_mask.to(scores.dtype)
    out = mha.out_proj((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, width))
    return out if mha.batch_first else out.transpose(0, 1)


@contextlib.contextmanager
def eager_vision_attention(tower):
    """Within the context the frozen tower's attention is written out, as the original's ViTs do:
    timm blocks with ``fused_attn`` off, open_clip blocks through :func:`plain_self_attention`."""
    from open_clip.transformer import ResidualAttentionBlock

    fused = [m for m in tower.modules() if getattr(m, "fused_attn", False)]
    original = ResidualAttentionBlock.attention

    def attention(self, q_x, k_x=None, v_x=None, attn_mask=None):
        if k_x is not None or v_x is not None:  # cross-attention: not in an image tower
            return original(self, q_x, k_x, v_x, attn_mask)
        return plain_self_attention(self.attn, q_x, attn_mask)

    for m in fused:
        m.fused_attn = False
    ResidualAttentionBlock.attention = attention
    try:
        yield
    finally:
        ResidualAttentionBlock.attention = original
        for m in fused:
            m.fused_attn = True


@contextlib.contextmanager
def eager_llm_attention(model):
    """The frozen LLM (a transformers model) with its attention written out, as the original ran OPT."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def original_text_tokens(tokenizer, captions: list[str], max_length: int,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The Q-Former's text as the original's forward makes it: the tokenizer on the step's strings
    (padded to ``max_length``), then copied to the device."""
    from blip2_ds.data.text import tokenize_batch

    ids, mask = tokenize_batch(tokenizer, captions, max_length)
    return ids.to(device), mask.to(device)


def original_opt_text(tokenizer, captions: list[str], max_length: int, device: torch.device):
    """OPT's text as LAVIS ``Blip2OPT.forward`` makes it (no prompt): the tokenizer on ``caption + "\\n"``
    (its ``</s>`` first, padded to the longest), targets -100 on the padding; a ``TextBatch``."""
    from blip2_ds.models.stage2 import IGNORE, TextBatch

    tokens = tokenizer([c + "\n" for c in captions], return_tensors="pt", padding="longest", truncation=True,
                       max_length=max_length).to(device)
    labels = tokens.input_ids.masked_fill(tokens.input_ids == tokenizer.pad_token_id, IGNORE)
    return TextBatch(tokens.input_ids, tokens.attention_mask, labels)


def _gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    return distributed.all_gather_no_grad(tensor)


def _per_sample_negatives(weights: torch.Tensor, generator: torch.Generator | None) -> list[int]:
    return [int(torch.multinomial(weights[b], 1, generator=generator).item()) for b in range(weights.shape[0])]


def original_stage1_loss(model: Stage1Model, image_embeds: torch.Tensor, text_ids: torch.Tensor,
                         text_mask: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """ITC + ITM + ITG as the original computes them (call inside :func:`eager_attention`).

    Returns the weighted total and each loss. ``generator`` draws the negatives (device generator).
    """
    objectives = model.objectives
    batch, rank = image_embeds.shape[0], distributed.rank()
    queries = model.query_tokens.expand(batch, -1, -1)
    image_states = model.vision_states(image_embeds)
    query_hidden, query_cache = model.qformer(query_embeds=queries, image_kv=model.qformer.image_kv(image_states),
                                              return_query_cache=True)
    image_feats = F.normalize(model.vision_proj(query_hidden), dim=-1)
    text_hidden, _ = model.qformer(text_ids=text_ids, self_mask=masks.unimodal_text_mask(text_mask))
    text_feat = F.normalize(model.text_proj(text_hidden[:, 0]), dim=-1)

    # ITC: features of the other ranks without gradient, (B, BW, Q) similarities in both directions.
    with loss_range("itc"):
        image_feats_all, text_feat_all = _gather_no_grad(image_feats), _gather_no_grad(text_feat)
        temperature = model.temperature()
        sim_i2t = torch.matmul(image_feats.unsqueeze(1), text_feat_all.unsqueeze(-1)).squeeze(-1).max(-1).values
        sim_t2i = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_feats_all.permute(0, 2, 1)).squeeze(-2)
        sim_t2i = sim_t2i.max(-1).values
        sim_i2t, sim_t2i = sim_i2t / temperature, sim_t2i / temperature
        targets = torch.arange(batch, device=image_embeds.device) + rank * batch
        smoothing = objectives.label_smoothing
        loss_itc = (F.cross_entropy(at_least_fp32(sim_i2t), targets, label_smoothing=smoothing)
                    + F.cross_entropy(at_least_fp32(sim_t2i), targets, label_smoothing=smoothing)) / 2

    # ITM: normalised image features of every rank gathered with gradient, negatives one by one.
    image_states_world = distributed.all_gather_with_grad(image_states)
    ids_world, mask_world = _gather_no_grad(text_ids), _gather_no_grad(text_mask)
    with torch.no_grad(), loss_range("itm_negatives"):
        own = slice(rank * batch, rank * batch + batch)
        weights_t2i, weights_i2t = at_least_fp32(sim_t2i).clone(), at_least_fp32(sim_i2t).clone()
        weights_t2i[:, own].fill_diagonal_(-10000)
        weights_i2t[:, own].fill_diagonal_(-10000)
        weights_t2i, weights_i2t = weights_t2i.softmax(dim=1), weights_i2t.softmax(dim=1)
        negative_image_rows, negative_texts = (_per_sample_negatives(weights_t2i, generator),
                                               _per_sample_negatives(weights_i2t, generator))
    negative_images = torch.stack([image_states_world[i] for i in negative_image_rows])
    pair_ids = torch.cat([text_ids, text_ids, ids_world[negative_texts]])
    pair_mask = torch.cat([text_mask, text_mask, mask_world[negative_texts]])
    pair_states = torch.cat([image_states, negative_images, image_states])
    num_queries = model.cfg.num_query_tokens
    itm_hidden, _ = model.qformer(query_embeds=model.query_tokens.expand(3 * batch, -1, -1), text_ids=pair_ids,
                                  self_mask=masks.bidirectional_mask(pair_mask, num_queries),
                                  image_kv=model.qformer.image_kv(pair_states))
    itm_logits = model.itm_head(itm_hidden[:, :num_queries]).mean(dim=1)
    with loss_range("itm"):
        itm_labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(itm_logits.device)
        loss_itm = F.cross_entropy(at_least_fp32(itm_logits), itm_labels)

    # ITG: text rows over the image pass's query keys/values.
    decoder_ids, labels = itg.decoder_inputs(text_ids, text_mask, model.bos_token_id)
    decoder_hidden, _ = model.qformer(
        text_ids=decoder_ids, query_cache=query_cache,
        self_mask=masks.multimodal_causal_mask(text_mask, num_queries, query_rows=False))
    # vocabulary logits at every position, padding included, then the shifted loss
    logits = model.qformer.lm_logits(decoder_hidden)[:, :-1]
    with loss_range("itg"):
        loss_itg = F.cross_entropy(at_least_fp32(logits).flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=itg.IGNORE_INDEX, label_smoothing=smoothing)

    loss = objectives.itc_weight * loss_itc + objectives.itm_weight * loss_itm + objectives.itg_weight * loss_itg
    return {"loss": loss, "loss_itc": loss_itc, "loss_itm": loss_itm, "loss_itg": loss_itg}


def original_stage2_loss(model, image_embeds: torch.Tensor, text) -> torch.Tensor:
    """Stage 2 as the original (LAVIS ``Blip2OPT.forward``) computes it: the soft prompt in front of
    the caption, vocabulary logits at EVERY position (queries included), targets -100 on the queries
    and the prompt. ``model``: a :class:`~blip2_ds.models.stage2.Stage2Model`; ``text``: its
    ``TextBatch``; call inside :func:`eager_attention` and :func:`eager_llm_attention`."""
    llm = model.llm
    soft = model.soft_prompt(image_embeds)
    ones = torch.ones(soft.shape[:2], dtype=text.attention_mask.dtype, device=soft.device)
    embeds = torch.cat([soft, llm.embed(text.input_ids).to(soft.dtype)], dim=1)
    mask = torch.cat([ones, text.attention_mask], dim=1)
    targets = torch.cat([torch.full(soft.shape[:2], -100, dtype=text.labels.dtype, device=soft.device),
                         text.labels], dim=1)
    logits = llm.model(inputs_embeds=embeds, attention_mask=mask).logits
    with loss_range("lm"):
        return F.cross_entropy(at_least_fp32(logits[:, :-1]).flatten(0, 1), targets[:, 1:].flatten(),
                               ignore_index=-100)
