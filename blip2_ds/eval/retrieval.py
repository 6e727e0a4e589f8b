"""Image-text retrieval as the paper evaluates it: ITC similarity for all pairs, then the top k
candidates re-ranked by ITM (score = ITM "match" logit + ITC similarity, as the original).

Several captions per image are allowed: ``text_image[j]`` is the image of caption j. Image-to-text
retrieval counts a hit when any of the image's captions is in the top r.
"""
from __future__ import annotations

import torch

from blip2_ds import distributed
from blip2_ds.eval.features import rank_share
from blip2_ds.kernels.contrastive import max_over_queries_similarity
from blip2_ds.models.stage1 import Stage1Model


def recall_at(scores: torch.Tensor, relevant: torch.Tensor, ranks=(1, 5, 10)) -> dict[int, float]:
    """``scores`` (queries, candidates); ``relevant`` bool of the same shape. Recall@r in percent."""
    order = scores.argsort(dim=1, descending=True)
    hits = relevant.gather(1, order)
    return {r: 100.0 * hits[:, :r].any(dim=1).float().mean().item() for r in ranks}


@torch.no_grad()
def retrieval_scores(model: Stage1Model, image_embeds: torch.Tensor, text_ids: torch.Tensor,
                     text_mask: torch.Tensor, k: int = 128, batch: int = 64) -> dict[str, torch.Tensor]:
    """Score matrices, queries x candidates: ``itc_i2t`` (images, texts), ``itc_t2i``, and the ITM
    re-ranked ``itm_i2t`` / ``itm_t2i`` (each query's top ``k`` ITC candidates re-scored, the others
    below them in ITC order, so that recall at r > k is still ITC's, not an accident of index order)."""
    model.eval()
    image_feats = torch.cat([model.encode_image(image_embeds[i:i + batch]) for i in range(0, len(image_embeds), batch)])
    text_feats = torch.cat([model.encode_text(text_ids[i:i + batch], text_mask[i:i + batch])
                            for i in range(0, len(text_ids), batch)])
    itc = max_over_queries_similarity(image_feats, text_feats, model.kernels).float()  # (images, texts)
    return {"itc_i2t": itc, "itc_t2i": itc.t(),
            "itm_i2t": _rerank(model, itc, image_embeds, text_ids, text_mask, min(k, itc.shape[1]),
                               images_are_queries=True),
            "itm_t2i": _rerank(model, itc.t(), image_embeds, text_ids, text_mask, min(k, itc.shape[0]),
                               images_are_queries=False)}


def recalls(scores: dict[str, torch.Tensor], text_image: torch.Tensor) -> dict[str, float]:
    """R@1/5/10 of every ranking in ``scores`` (see :func:`retrieval_scores`), plus chance R@1."""
    images = scores["itc_i2t"].shape[0]
    relevant = text_image[None, :].to(scores["itc_i2t"].device) == torch.arange(images, device=scores["itc_i2t"].device)[:, None]
    out: dict[str, float] = {}
    for name, matrix in scores.items():
        for r, value in recall_at(matrix, relevant if name.endswith("i2t") else relevant.t()).items():
            out[f"{name}_r{r}"] = value
    out["chance_i2t_r1"] = 100.0 * relevant.float().sum(1).mean().item() / relevant.shape[1]
    out["chance_t2i_r1"] = 100.0 / relevant.shape[0]
    return out


def retrieval_metrics(model: Stage1Model, image_embeds: torch.Tensor, text_ids: torch.Tensor,
                      text_mask: torch.Tensor, text_image: torch.Tensor, k: int = 128,
                      batch: int = 64) -> dict[str, float]:
    """R@1/5/10 for text->image and image->text, ITC only and ITM re-ranked; plus chance R@1."""
    return recalls(retrieval_scores(model, image_embeds, text_ids, text_mask, k, batch), text_image)


def _rerank(model, itc, image_embeds, text_ids, text_mask, k, images_are_queries: bool) -> torch.Tensor:
    """ITM + ITC scores of each query's top-k ITC candidates, the other candidates below all of them in
    ITC order; the queries are split across ranks and the rows combined with an all-reduce (max)."""
    scores = torch.full_like(itc, float("-inf"))
    top = itc.topk(k, dim=1)
    for query in rank_share(range(itc.shape[0])):
        candidates = top.indices[query]
        if images_are_queries:
            images = image_embeds[query].expand(k, *image_embeds.shape[1:])
            ids, mask = text_ids[candidates], text_mask[candidates]
        else:
            images = image_embeds[candidates]
            ids, mask = text_ids[query].expand(k, -1), text_mask[query].expand(k, -1)
        match = model.itm_logits(images, ids, mask)[:, 1]
        scores[query, candidates] = match.float() + top.values[query]
    if distributed.is_distributed():
        torch.distributed.all_reduce(scores, op=torch.distributed.ReduceOp.MAX)
    reranked = torch.isfinite(scores)
    below = itc - (itc.max() - scores[reranked].min() + 1)  # every value under the lowest re-ranked score
    return torch.where(reranked, scores, below)
