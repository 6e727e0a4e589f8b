"""The three evaluations, split across ranks: each returns ``{"metrics", "predictions"[, "unavailable"]}``.

Frozen-ViT features (retrieval) or generated texts (captioning, VQA) are computed for this rank's
share of the inputs and gathered in input order, so every rank holds the same result; scoring is
deterministic and identical on every rank (rank 0 writes it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from blip2_ds.config import GenerationConfig
from blip2_ds.eval.features import gather, gather_rows, image_features, rank_share
from blip2_ds.eval.inputs import EvalImage, VqaQuestion


def retrieval(model, tower, tokenizer, max_text_len: int, images: Sequence[EvalImage], image_size: int,
              device, k: int, batch_size: int) -> dict[str, Any]:
    """Image <-> text retrieval over every caption of every image (ITC, then top-k ITM re-ranking)."""
    from blip2_ds.data.text import clean_caption, tokenize_batch
    from blip2_ds.eval.retrieval import recalls, retrieval_scores

    embeds = gather_rows(image_features(tower, rank_share(images), image_size, device, batch_size), len(images))
    captions = [caption for image in images for caption in image.captions]
    text_image = torch.tensor([i for i, image in enumerate(images) for _ in image.captions])
    # The Q-Former reads captions as it was trained on them (and as the original's retrieval evaluates).
    ids, mask = tokenize_batch(tokenizer, [clean_caption(caption) for caption in captions], max_text_len)
    scores = retrieval_scores(model, embeds, ids.to(device), mask.to(device), k, batch_size)
    metrics = recalls(scores, text_image)
    top_texts = scores["itm_i2t"].topk(min(5, len(captions)), dim=1).indices.tolist()
    top_images = scores["itm_t2i"].topk(min(5, len(images)), dim=1).indices.tolist()
    predictions = {
        "image_to_text": [{"image": image.key, "top5": [captions[j] for j in top]} for image, top in zip(images, top_texts)],
        "text_to_image": [{"caption": caption, "image": images[int(text_image[j])].key,
                           "top5": [images[i].key for i in top_images[j]]} for j, caption in enumerate(captions)],
    }
    return {"metrics": metrics, "predictions": predictions}


def _generate(model, tower, images: Sequence[EvalImage], prompts: Sequence[str], image_size: int, device,
              gen: GenerationConfig, batch_size: int) -> list[str]:
    """Texts for this rank's share of (image, prompt) pairs, gathered in order (one text per pair)."""
    pairs = rank_share(list(zip(images, prompts)))
    texts: list[str] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        # VQA asks several questions about one image (consecutive in VQAv2's files): one ViT pass per image.
        distinct = list({id(image): image for image, _ in chunk}.values())
        row = {id(image): i for i, image in enumerate(distinct)}
        features = image_features(tower, distinct, image_size, device, batch_size)
        embeds = features[[row[id(image)] for image, _ in chunk]]
        texts += model.generate(embeds, [prompt for _, prompt in chunk], gen)
    return gather(texts)


def captioning(model, tower, images: Sequence[EvalImage], image_size: int, device, prompt: str,
               gen: GenerationConfig, batch_size: int, metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """One generated caption per image (``generation.num_captions`` is forced to 1), scored against the
    references with ``metrics`` (default: all of :data:`blip2_ds.eval.caption_metrics.METRICS`)."""
    from blip2_ds.eval.caption_metrics import METRICS, caption_scores

    gen = dataclasses.replace(gen, num_captions=1)
    texts = _generate(model, tower, images, [prompt] * len(images), image_size, device, gen, batch_size)
    predictions = {image.key: text for image, text in zip(images, texts)}
    scored = caption_scores(predictions, {image.key: image.captions for image in images}, metrics or METRICS)
    unavailable = scored.pop("unavailable")
    return {"metrics": scored, "unavailable": unavailable,
            "predictions": [{"image": image.key, "caption": text, "references": image.captions}
                            for image, text in zip(images, texts)]}


def vqa(model, tower, questions: Sequence[VqaQuestion], image_size: int, device, template: str,
        gen: GenerationConfig, batch_size: int) -> dict[str, Any]:
    """Zero-shot VQA: the question in ``template`` as the prompt; VQAv2 accuracy when answers are known."""
    from blip2_ds.eval.vqa_accuracy import evaluate_vqa

    gen = dataclasses.replace(gen, num_captions=1)
    prompts = [template.format(q.question) for q in questions]
    answers = _generate(model, tower, [q.image for q in questions], prompts, image_size, device, gen, batch_size)
    predictions = [{"question_id": q.question_id, "question": q.question, "answer": a}
                   for q, a in zip(questions, answers)]
    if not any(q.answers for q in questions):
        return {"metrics": {}, "unavailable": {"accuracy": "no --annotations given"}, "predictions": predictions}
    scored = evaluate_vqa({q.question_id: a for q, a in zip(questions, answers)},
                          [{"question_id": q.question_id, "answer_type": q.answer_type,
                            "answers": [{"answer": a} for a in q.answers]} for q in questions])
    for prediction in predictions:
        prediction["accuracy"] = scored.per_question[prediction["question_id"]]
    return {"metrics": {"accuracy": scored.overall,
                        **{f"accuracy_{kind}": value for kind, value in scored.per_answer_type.items()}},
            "predictions": predictions}
