"""Retrieval metrics: recall against a hand count, and ITM re-ranking of the ITC top k."""
import torch
from conftest import random_text

from blip2_ds.eval.retrieval import recall_at, retrieval_metrics, retrieval_scores
from blip2_ds.models.stage1 import Stage1Model


def test_recall_counts_any_relevant_candidate_in_the_top_r():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.0, 0.9, 0.8]])
    relevant = torch.tensor([[False, False, True], [True, False, False], [False, False, True]])
    # query 0: relevant ranked 2nd; query 1: 2nd; query 2: 2nd.
    assert recall_at(scores, relevant, ranks=(1, 2, 3)) == {1: 0.0, 2: 100.0, 3: 100.0}
    relevant[1, 1] = True  # a second relevant candidate for query 1, ranked first
    assert abs(recall_at(scores, relevant, ranks=(1,))[1] - 100.0 / 3) < 1e-4


def test_itm_reranking_only_reorders_the_itc_top_k(tiny_cfg):
    torch.manual_seed(0)
    model = Stage1Model(tiny_cfg)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(6, 5, tiny_cfg.vision_width, generator=generator)
    ids, mask = random_text(6, 8, tiny_cfg.vocab_size, generator)
    metrics = retrieval_metrics(model, images, ids, mask, torch.arange(6), k=3, batch=4)
    assert metrics["chance_t2i_r1"] == 100 / 6
    for direction in ("i2t", "t2i"):
        # R@3 cannot change: re-ranking permutes the ITC top 3 and leaves the rest below them.
        assert metrics[f"itm_{direction}_r5"] >= metrics[f"itm_{direction}_r1"]
        assert abs(metrics[f"itc_{direction}_r10"] - 100.0) < 1e-9
    with torch.no_grad():
        itc = model.image_text_similarity(images, ids, mask)
        top3 = itc.topk(3, dim=1).indices
    hits_itc_top3 = (top3 == torch.arange(6)[:, None]).any(1).float().mean().item() * 100
    from blip2_ds.eval import retrieval

    scores = retrieval._rerank(model, itc, images, ids, mask, 3, images_are_queries=True)
    reranked_top3 = scores.topk(3, dim=1).indices
    assert torch.equal(reranked_top3.sort(1).values, top3.sort(1).values)
    assert (reranked_top3 == torch.arange(6)[:, None]).any(1).float().mean().item() * 100 == hits_itc_top3


def test_reranking_keeps_the_itc_order_outside_the_top_k_and_each_direction_has_its_own_k(tiny_cfg):
    """With a constant ITM logit every re-ranked order must be ITC's, at every r (not the candidates' index
    order past the top k); and image->text re-ranks k of the 5x more texts, not k capped by the image count."""
    torch.manual_seed(0)
    model = Stage1Model(tiny_cfg)
    model.itm_logits = lambda images, ids, mask: torch.tensor([[0.0, 100.0]]).expand(len(ids), 2)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(6, 5, tiny_cfg.vision_width, generator=generator)
    ids, mask = random_text(30, 8, tiny_cfg.vocab_size, generator)
    scores = retrieval_scores(model, images, ids, mask, k=20, batch=4)
    reranked = {d: torch.isclose(scores[f"itm_{d}"] - scores[f"itc_{d}"], torch.tensor(100.0), atol=1e-4)
                for d in ("i2t", "t2i")}  # ITM + ITC there; the rest are moved below them
    assert (reranked["i2t"].sum(1) == 20).all()  # 20 of the 30 texts per image, not min(20, 6)
    assert (reranked["t2i"].sum(1) == 6).all()
    for direction in ("i2t", "t2i"):
        itc_order = scores[f"itc_{direction}"].argsort(1, descending=True)
        assert torch.equal(scores[f"itm_{direction}"].argsort(1, descending=True), itc_order), direction
    scores = retrieval_scores(model, images, ids, mask, k=2, batch=4)  # recall at 5 and 10 > k: still ITC's
    for direction in ("i2t", "t2i"):
        itc_order = scores[f"itc_{direction}"].argsort(1, descending=True)
        assert torch.equal(scores[f"itm_{direction}"].argsort(1, descending=True), itc_order), direction
