"""Evaluation inputs: images with their reference captions, or VQA questions with their answers.

Readers (all checked before any model is built: a missing file is an error naming it):

- caption JSON + image folder, in any of the three layouts in use:
  Karpathy's ``dataset_coco.json`` (``images[].filepath/filename/split/sentences[].raw``),
  LAVIS's ``coco_karpathy_test.json`` (a list of ``{"image": path, "caption": str | [str]}``),
  COCO's ``captions_val2014.json`` (``images[].id/file_name`` + ``annotations[].image_id/caption``);
- VQAv2 question + annotation JSON + image folder (``COCO_{data_subtype}_{image_id:012d}.jpg``);
- WebDataset shards (one caption per sample, the training layout; samples sharing a json ``image_id`` are one image).
"""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from pathlib import Path

from blip2_ds.config import ConfigError


@dataclass
class EvalImage:
    key: str
    """Identifier in the outputs (COCO image id, file name or shard key)."""
    path: Path | None = None
    """Image file (None when the bytes come from a shard)."""
    data: bytes | None = None
    """Encoded image bytes (shards)."""
    captions: list[str] = field(default_factory=list)
    """Reference captions (several for COCO / Flickr)."""

    def read(self) -> bytes:
        return self.data if self.data is not None else self.path.read_bytes()


@dataclass
class VqaQuestion:
    question_id: int
    image: EvalImage
    question: str
    answers: list[str]
    """The 10 annotators' raw answers (empty when only questions are given)."""
    answer_type: str = "other"


def _load_json(path: str | Path, what: str):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path}: file not found (paths are local; nothing is downloaded).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{what} {path}: not valid JSON ({err}).") from None


def _check_images_exist(images: list[EvalImage], source: Path) -> None:
    missing = [str(image.path) for image in images if image.path is not None and not image.path.is_file()]
    if missing:
        raise ConfigError(f"{source}: {len(missing)} image file(s) not found under the image folder, e.g. "
                          f"{missing[0]}; check --images (the folder the JSON's paths are relative to).")


def read_caption_json(json_path: str | Path, image_root: str | Path, split: str | None = "test",
                      limit: int | None = None) -> list[EvalImage]:
    """Images and their reference captions from a Karpathy, LAVIS or COCO captions JSON.

    ``split`` filters Karpathy's file (``test``, ``val``, ``restval``, ``train``; None = all);
    the other layouts have one split per file.
    """
    json_path, root = Path(json_path), Path(image_root)
    data = _load_json(json_path, "caption JSON")
    if isinstance(data, dict) and "images" in data and data["images"] and "sentences" in data["images"][0]:
        images = [EvalImage(str(item.get("cocoid", item.get("imgid", item["filename"]))),
                            root / item.get("filepath", "") / item["filename"],
                            captions=[s["raw"].strip() for s in item["sentences"]])
                  for item in data["images"] if split is None or item.get("split") == split]
    elif isinstance(data, list):
        images = [EvalImage(Path(item["image"]).stem, root / item["image"],
                            captions=[item["caption"]] if isinstance(item["caption"], str) else list(item["caption"]))
                  for item in data]
    elif isinstance(data, dict) and "annotations" in data and "images" in data:
        captions = collections.defaultdict(list)
        for note in data["annotations"]:
            captions[note["image_id"]].append(note["caption"].strip())
        images = [EvalImage(str(item["id"]), root / item["file_name"], captions=captions[item["id"]])
                  for item in data["images"] if captions[item["id"]]]
    else:
        raise ConfigError(f"caption JSON {json_path}: not a Karpathy (images[].sentences), LAVIS (list of "
                          "{image, caption}) or COCO captions (images + annotations) file.")
    if not images:
        raise ConfigError(f"caption JSON {json_path}: no images" + (f" in split {split!r}" if split else "") + ".")
    images = images[:limit]
    _check_images_exist(images, json_path)
    return _unique_keys(images, f"caption JSON {json_path}")


def read_caption_shards(pattern: str, limit: int | None = None,
                        extensions=("jpg", "jpeg", "png", "webp")) -> list[EvalImage]:
    """Images and captions from tar shards (one caption per sample; samples without either skipped).

    Samples whose json names the same ``image_id`` (COCO written by ``blip2_ds.data.write folder``: one
    sample per caption, spread over the shards) are one image with all their captions, keyed by that id:
    as separate images, retrieval would count the copies as wrong answers and captioning would score
    each prediction against one reference. ``limit`` counts images; their captions are gathered from
    every shard.
    """
    from blip2_ds.data.shards import expand_urls
    from blip2_ds.data.tario import iter_samples
    from blip2_ds.data.text import clean_caption

    urls = expand_urls(pattern)  # a missing local shard is a ConfigError naming it
    counts: collections.Counter = collections.Counter()
    images: list[EvalImage] = []
    by_image_id: dict[str, EvalImage] = {}
    for url in urls:
        for _, key, fields in iter_samples(url, counts):
            extension = next((e for e in extensions if e in fields), None)
            caption = clean_caption(fields.get("txt", b"").decode("utf-8", errors="replace"))
            if extension is None or not caption:
                continue
            image_id = _image_id(fields.get("json"))
            if image_id in by_image_id:
                by_image_id[image_id].captions.append(caption)
                continue
            if limit is not None and len(images) == limit:
                if not by_image_id:
                    return images  # no grouping: nothing more to gather
                continue
            images.append(EvalImage(key if image_id is None else image_id, data=fields[extension],
                                    captions=[caption]))
            if image_id is not None:
                by_image_id[image_id] = images[-1]
    if not images:
        raise ConfigError(f"--shards {pattern}: no sample with an image and a caption.")
    return _unique_keys(images, f"--shards {pattern}")


def _image_id(meta: bytes | None) -> str | None:
    """The sample json's ``image_id`` as text, or None (no json, not JSON, no id: img2dataset's samples)."""
    if meta is None:
        return None
    try:
        value = json.loads(meta)
    except (ValueError, UnicodeDecodeError):
        return None
    image_id = value.get("image_id") if isinstance(value, dict) else None
    return None if image_id is None else str(image_id)


def _unique_keys(images: list[EvalImage], source: str) -> list[EvalImage]:
    """The outputs (predictions, per-image metrics) are keyed by image: two images under one key would merge."""
    repeated = [key for key, n in collections.Counter(image.key for image in images).items() if n > 1]
    if repeated:
        raise ConfigError(f"{source}: {len(repeated)} keys name more than one image (e.g. {repeated[0]!r}); the "
                          f"evaluation's outputs are keyed by image, so each needs its own.")
    return images


def read_vqa(questions_path: str | Path, annotations_path: str | Path | None, image_root: str | Path,
             image_pattern: str | None = None, limit: int | None = None) -> list[VqaQuestion]:
    """VQAv2 questions (and, for scoring, annotations); images at ``image_root / image_pattern``.

    ``image_pattern`` defaults to COCO's ``COCO_{data_subtype}_{image_id:012d}.jpg`` with the
    questions file's ``data_subtype`` (e.g. val2014).
    """
    questions = _load_json(questions_path, "VQA questions")
    if "questions" not in questions:
        raise ConfigError(f"VQA questions {questions_path}: no 'questions' list (expected VQAv2's "
                          "v2_OpenEnded_mscoco_*_questions.json).")
    if image_pattern is None:
        subtype = questions.get("data_subtype")
        if subtype is None:
            raise ConfigError(f"VQA questions {questions_path}: no data_subtype; give --image-pattern, "
                              "e.g. 'COCO_val2014_{image_id:012d}.jpg'.")
        image_pattern = f"COCO_{subtype}_{{image_id:012d}}.jpg"
    annotations = {}
    if annotations_path is not None:
        notes = _load_json(annotations_path, "VQA annotations")
        annotations = {a["question_id"]: a for a in notes.get("annotations", [])}
    root = Path(image_root)
    shared: dict[int, EvalImage] = {}
    out = []
    for item in questions["questions"][:limit]:
        image_id = item["image_id"]
        if image_id not in shared:
            shared[image_id] = EvalImage(str(image_id), root / image_pattern.format(image_id=image_id))
        note = annotations.get(item["question_id"])
        if annotations and note is None:
            raise ConfigError(f"VQA annotations {annotations_path}: no annotation for question {item['question_id']}.")
        out.append(VqaQuestion(item["question_id"], shared[image_id], item["question"],
                               [a["answer"] for a in note["answers"]] if note else [],
                               note.get("answer_type", "other") if note else "other"))
    if not out:
        raise ConfigError(f"VQA questions {questions_path}: no questions.")
    _check_images_exist(list(shared.values()), Path(questions_path))
    return out
