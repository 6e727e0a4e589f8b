"""Stage 1: vision-language representation learning (ITC + ITM + ITG) on frozen image features.

Takes the frozen vision tower's output (B, N, vision_width) so that the tower stays outside
this module (and outside the optimizer). One step:

1. ``ln_vision`` (fp32) on the image features, then each cross-attention layer's keys/values
   once for the whole step;
2. image pass (queries only) -> ``image_feats`` (B, Q, 256); text pass (text only) -> ``text_feat``;
3. ITC over the global batch; hard negatives drawn from its logits;
4. ITM pass on 3B pairs (bi-directional mask), reusing the local images' keys/values;
5. ITG pass (text rows only), reusing the image pass's query keys/values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blip2_ds import distributed
from blip2_ds.config import ObjectiveConfig, QFormerConfig
from blip2_ds.kernels.contrastive import max_over_queries_similarity
from blip2_ds.models import masks
from blip2_ds.models.qformer import ImageKV, KeyValue, QFormer, init_weights
from blip2_ds.objectives import itc, itg, itm


@dataclass
class Stage1Output:
    loss: torch.Tensor
    """Weighted sum of the three losses (the one to backpropagate)."""
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_itg: torch.Tensor
    itm_accuracy: torch.Tensor
    temperature: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """Host floats for logging (synchronises with the device)."""
        return {name: float(getattr(self, name).detach()) for name in
                ("loss", "loss_itc", "loss_itm", "loss_itg", "itm_accuracy", "temperature")}


class Stage1Model(nn.Module):
    """``ln_vision`` + Q-Former + ``vision_proj`` / ``text_proj`` + ``itm_head`` + temperature."""

    def __init__(self, model: QFormerConfig, objectives: ObjectiveConfig | None = None, bos_token_id: int | None = None,
                 kernels: str = "auto"):
        super().__init__()
        self.cfg = model
        self.kernels = kernels
        """auto / triton / torch: the cross-attention and ITC similarity paths (:mod:`blip2_ds.kernels`)."""
        self.objectives = objectives or ObjectiveConfig()
        self.objectives.validate()
        # [DEC] is the token the tokenizer appends to BERT's vocabulary: the last id.
        self.bos_token_id = model.vocab_size - 1 if bos_token_id is None else bos_token_id
        self.query_tokens = nn.Parameter(torch.zeros(1, model.num_query_tokens, model.hidden_size))
        self.ln_vision = nn.LayerNorm(model.vision_width, eps=model.vision_norm_eps)
        self.qformer = QFormer(model, with_text=True, kernels=kernels)
        self.vision_proj = nn.Linear(model.hidden_size, model.embed_dim)
        self.text_proj = nn.Linear(model.hidden_size, model.embed_dim)
        self.itm_head = nn.Linear(model.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(self.objectives.temperature_init))
        self._forward_calls = 0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.cfg.init_std)
        nn.init.normal_(self.query_tokens, std=self.cfg.init_std)
        with torch.no_grad():
            self.temp.fill_(self.objectives.temperature_init)

    # ---- building blocks -------------------------------------------------------------------
    def vision_states(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """``ln_vision`` in fp32 (or wider), whatever the dtype of the frozen features or of this module."""
        dtype = torch.promote_types(torch.promote_types(image_embeds.dtype, self.ln_vision.weight.dtype), torch.float32)
        return F.layer_norm(
            image_embeds.to(dtype), (self.cfg.vision_width,),
            self.ln_vision.weight.to(dtype), self.ln_vision.bias.to(dtype), self.cfg.vision_norm_eps,
        )

    def temperature(self) -> torch.Tensor:
        """The ITC temperature clamped to [temperature_min, temperature_max]."""
        return self.temp.clamp(self.objectives.temperature_min, self.objectives.temperature_max)

    @torch.no_grad()
    def clamp_parameters_(self) -> None:
        """Clamp the stored temperature in place (call after each optimizer step)."""
        self.temp.clamp_(self.objectives.temperature_min, self.objectives.temperature_max)

    def _queries(self, batch: int) -> torch.Tensor:
        return self.query_tokens.expand(batch, -1, -1)

    def _image_pass(self, image_kv: ImageKV, batch: int, want_cache: bool = False):
        hidden, cache = self.qformer(query_embeds=self._queries(batch), image_kv=image_kv,
                                     return_query_cache=want_cache)
        return F.normalize(self.vision_proj(hidden), dim=-1), cache

    def _text_feat(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.qformer(text_ids=text_ids, self_mask=masks.unimodal_text_mask(text_mask))
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def _itm_logits_from_kv(self, image_kv: ImageKV, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        num_queries = self.cfg.num_query_tokens
        hidden, _ = self.qformer(
            query_embeds=self._queries(text_ids.shape[0]), text_ids=text_ids,
            self_mask=masks.bidirectional_mask(text_mask, num_queries), image_kv=image_kv,
        )
        return self.itm_head(hidden[:, :num_queries]).mean(dim=1)

    # ---- evaluation / retrieval API ----------------------------------------------------------
    def encode_image(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Frozen-ViT output (B, N, vision_width) -> normalised query features (B, Q, embed_dim)."""
        feats, _ = self._image_pass(self.qformer.image_kv(self.vision_states(image_embeds)), image_embeds.shape[0])
        return feats

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> normalised [CLS] feature (B, embed_dim)."""
        return self._text_feat(text_ids, text_mask)

    def image_text_similarity(self, image_embeds: torch.Tensor, text_ids: torch.Tensor,
                              text_mask: torch.Tensor) -> torch.Tensor:
        """ITC score of every image against every text: (B_images, B_texts), max cosine over queries."""
        return max_over_queries_similarity(self.encode_image(image_embeds), self.encode_text(text_ids, text_mask),
                                           self.kernels)

    def itm_logits(self, image_embeds: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """ITM logits (B, 2) of explicit pairs (image i, text i); column 1 = "match"."""
        return self._itm_logits_from_kv(self.qformer.image_kv(self.vision_states(image_embeds)), text_ids, text_mask)

    # ---- training ---------------------------------------------------------------------------
    def forward(self, image_embeds: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                sample_seed: int | None = None) -> Stage1Output:
        """Stage-1 losses for a local batch.

        ``sample_seed`` drives the hard-negative draw and must be equal on every rank (pass the
        global step for an exactly resumable run); by default a per-call counter is combined
        with ``objectives.negative_sampling_seed``.
        """
        if sample_seed is None:
            sample_seed = self._forward_calls
        self._forward_calls += 1
        sample_seed = hash((self.objectives.negative_sampling_seed, sample_seed)) & 0x7FFF_FFFF_FFFF_FFFF
        batch = image_embeds.shape[0]
        objectives = self.objectives

        image_kv = self.qformer.image_kv(self.vision_states(image_embeds))
        image_feats, query_cache = self._image_pass(image_kv, batch, want_cache=True)
        text_feat = self._text_feat(text_ids, text_mask)
        contrastive = itc.itc_loss(image_feats, text_feat, self.temperature(), objectives.label_smoothing,
                                   self.kernels)

        matching = self._matching(image_embeds, image_kv, text_ids, text_mask, contrastive, sample_seed)

        decoder_ids, labels = itg.decoder_inputs(text_ids, text_mask, self.bos_token_id)
        text_hidden, _ = self.qformer(
            text_ids=decoder_ids,
            self_mask=masks.multimodal_causal_mask(text_mask, self.cfg.num_query_tokens, query_rows=False),
            query_cache=query_cache,
        )
        predicting, targets = itg.next_token_positions(labels)
        generation = itg.itg_loss(self.qformer.lm_logits(text_hidden[:, :-1][predicting]), targets,
                                  objectives.label_smoothing)

        loss = (objectives.itc_weight * contrastive.loss + objectives.itm_weight * matching.loss
                + objectives.itg_weight * generation)
        return Stage1Output(loss, contrastive.loss, matching.loss, generation, matching.accuracy,
                            self.temperature().detach())

    def _matching(self, image_embeds, image_kv: ImageKV, text_ids, text_mask,
                  contrastive: itc.ItcResult, sample_seed: int) -> itm.ItmResult:
        batch = image_embeds.shape[0]
        neg_text_idx, neg_image_idx = itm.sample_hard_negatives(
            contrastive.logits_i2t.detach(), contrastive.logits_t2i.detach(),
            row_offset=distributed.rank() * batch, seed=sample_seed,
        )
        # Only the chosen negatives' frozen features are fetched (no grad), then normalised here:
        # ln_vision's gradient from a negative is computed locally (and averaged like any other),
        # instead of all-gathering every rank's normalised features with grad as the original does.
        negative_images = distributed.fetch_rows(image_embeds, neg_image_idx)
        negative_kv = self.qformer.image_kv(self.vision_states(negative_images))
        pair_kv: ImageKV = [
            None if local is None else KeyValue.cat([local, negative, local])
            for local, negative in zip(image_kv, negative_kv)
        ]
        negative_ids = distributed.all_gather_no_grad(text_ids)[neg_text_idx]
        negative_mask = distributed.all_gather_no_grad(text_mask)[neg_text_idx]
        pair_ids = torch.cat([text_ids, text_ids, negative_ids])
        pair_mask = torch.cat([text_mask, text_mask, negative_mask])
        return itm.itm_loss(self._itm_logits_from_kv(pair_kv, pair_ids, pair_mask))
