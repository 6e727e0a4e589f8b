"""`python -m blip2_ds.eval` as users run it, on the demo assets, with checkpoints saved like the trainer's."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, subprocess_env

from blip2_ds.config import ConfigError, load_config, to_dict
from blip2_ds.demo_assets import ensure_demo_assets
from blip2_ds.eval.inputs import read_caption_json, read_caption_shards, read_vqa
from blip2_ds.state_io import write_safetensors

IMAGES = 6


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return ensure_demo_assets(tmp_path_factory.mktemp("eval_assets"), num_train=80, num_val=IMAGES * 2,
                              samples_per_shard=40, llm_steps=5)


def _config(assets, stage: int):
    return load_config(ROOT / "configs" / "demo.yaml", [
        f"stage={stage}", f"model.vocab_size={assets.vocab_size}", f"pretrained.tokenizer_path={assets.tokenizer}",
        f"vision.model_config={assets.vision_config}", f"vision.checkpoint={assets.vision_checkpoint}",
        f"language.path={assets.llm}", "generation.num_beams=2", "generation.max_new_tokens=5",
        "generation.min_new_tokens=1"])


def _save_checkpoint(folder: Path, cfg, model) -> Path:
    """What CheckpointManager.save writes for inference: model.safetensors + config.yaml."""
    folder.mkdir(parents=True)
    write_safetensors({k: v.detach().float() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def checkpoints(assets, tmp_path_factory):
    from blip2_ds.models.language import build_language_model
    from blip2_ds.models.stage1 import Stage1Model
    from blip2_ds.models.stage2 import Stage2Model

    root = tmp_path_factory.mktemp("eval_ckpt")
    torch.manual_seed(0)
    cfg1, cfg2 = _config(assets, 1), _config(assets, 2)
    stage1 = _save_checkpoint(root / "stage1", cfg1, Stage1Model(cfg1.model, cfg1.objectives))
    stage2 = _save_checkpoint(root / "stage2", cfg2, Stage2Model(cfg2.model, build_language_model(cfg2.language)))
    return stage1, stage2


@pytest.fixture(scope="module")
def coco_like(assets, tmp_path_factory):
    """The held-out shard as an image folder + a Karpathy JSON (2 captions per image) + VQAv2 JSONs."""
    root = tmp_path_factory.mktemp("coco_like")
    (root / "val2014").mkdir()
    samples = read_caption_shards(assets.val_pattern, limit=IMAGES * 2)
    images = []
    for index in range(IMAGES):
        first, second = samples[2 * index], samples[2 * index + 1]
        name = f"COCO_val2014_{index + 1:012d}.jpg"
        (root / "val2014" / name).write_bytes(first.data)
        images.append({"filepath": "val2014", "filename": name, "split": "test", "cocoid": index + 1,
                       "sentences": [{"raw": first.captions[0]}, {"raw": second.captions[0]}]})
    images.append({**images[0], "split": "train", "cocoid": 999})  # filtered out by --split test
    (root / "karpathy.json").write_text(json.dumps({"images": images}))
    questions = [{"image_id": i + 1, "question": "what colour is the shape?", "question_id": 10 * (i + 1)}
                 for i in range(IMAGES)]
    (root / "questions.json").write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    notes = [{"question_id": q["question_id"], "answer_type": "other",
              "answers": [{"answer": "red"}] * 10} for q in questions]
    (root / "annotations.json").write_text(json.dumps({"annotations": notes}))
    return root


def run_eval(*args, ranks: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    if ranks == 1:
        command = [sys.executable, "-m", "blip2_ds.eval", *map(str, args)]
    else:
        from train_runs import free_port

        command = [str(Path(sys.executable).with_name("torchrun")), f"--nproc_per_node={ranks}",
                   f"--master_port={free_port()}", str(ROOT / "launch" / "eval.py"), *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_caption_json_layouts_read_the_same_images(coco_like, tmp_path):
    karpathy = read_caption_json(coco_like / "karpathy.json", coco_like)
    assert len(karpathy) == IMAGES and all(len(image.captions) == 2 for image in karpathy)
    lavis = [{"image": f"val2014/{Path(image.path).name}", "caption": image.captions} for image in karpathy]
    (tmp_path / "lavis.json").write_text(json.dumps(lavis))
    coco = {"images": [{"id": int(image.key), "file_name": f"val2014/{image.path.name}"} for image in karpathy],
            "annotations": [{"image_id": int(image.key), "caption": c} for image in karpathy for c in image.captions]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    for path in ("lavis.json", "coco.json"):
        other = read_caption_json(tmp_path / path, coco_like)
        assert [(i.path, i.captions) for i in other] == [(i.path, i.captions) for i in karpathy], path
    questions = read_vqa(coco_like / "questions.json", coco_like / "annotations.json", coco_like / "val2014")
    assert len(questions) == IMAGES and questions[0].answers == ["red"] * 10
    assert questions[0].image.path.name == "COCO_val2014_000000000001.jpg"


def test_bad_inputs_fail_in_one_line_before_any_model(checkpoints, coco_like, tmp_path):
    stage1, stage2 = checkpoints
    (tmp_path / "val2014").mkdir()  # an image folder without the images
    cases = [
        (["retrieval", "--checkpoint", stage1, "--captions", coco_like / "karpathy.json", "--images", tmp_path],
         "image file(s) not found"),
        (["caption", "--checkpoint", stage1, "--captions", coco_like / "karpathy.json", "--images", coco_like],
         "stage-2 model"),
        (["retrieval", "--checkpoint", tmp_path, "--shards", "x.tar"], "not a run folder"),
        (["vqa", "--checkpoint", stage2, "--questions", tmp_path / "nope.json", "--images", coco_like], "nope.json"),
    ]
    for args, expected in cases:
        run = run_eval(*args, timeout=120)
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert run.returncode == 2 and len(lines) == 1 and expected in lines[0], (args, run.stderr)


def test_shard_images_are_keyed_by_their_sample_keys_which_must_be_unique(assets, tmp_path):
    import collections
    import shutil

    from blip2_ds.data.shards import expand_urls
    from blip2_ds.data.tario import iter_samples

    first = expand_urls(assets.val_pattern)[0]
    keys = [key for _, key, _ in iter_samples(first, collections.Counter())][:3]
    assert [image.key for image in read_caption_shards(first, limit=3)] == keys  # not the positions 1, 2, 3
    shutil.copy(first, tmp_path / "a.tar")
    shutil.copy(first, tmp_path / "b.tar")  # the same keys again: predictions keyed by image would merge
    with pytest.raises(ConfigError, match="keys name more than one image"):
        read_caption_shards(str(tmp_path / "{a,b}.tar"))


def test_shard_samples_of_one_coco_image_are_one_image_with_its_captions(tmp_path):
    """COCO written one sample per caption, shuffled over shards: one image per id, every caption, in any shard."""
    from blip2_ds.data.write import write_from_folder
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (8, 8), (len(name), 0, 0)).save(folder / name)
    coco = {"images": [{"id": i, "file_name": name} for i, name in enumerate(("a.jpg", "b.jpg", "c.jpg"))],
            "annotations": [{"image_id": i, "caption": f"photo {i} caption {n}"} for i in range(3) for n in range(4)]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    written = write_from_folder(folder, tmp_path / "captions.json", tmp_path / "shards", samples_per_shard=5)
    assert len(written.shards) == 3
    images = read_caption_shards(written.pattern)
    assert sorted(image.key for image in images) == ["0", "1", "2"]
    assert all(sorted(image.captions) == [f"photo {image.key} caption {n}" for n in range(4)] for image in images)
    first_two = read_caption_shards(written.pattern, limit=2)
    assert len(first_two) == 2 and all(len(image.captions) == 4 for image in first_two)  # gathered from all shards


def test_fewer_inputs_than_ranks_fail_before_the_process_group(checkpoints, assets, monkeypatch):
    from blip2_ds.eval.__main__ import check, parse_args

    stage1, _ = checkpoints
    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29555").items():
        monkeypatch.setenv(name, value)  # what torchrun sets; no process group exists at this point
    args = ["retrieval", "--checkpoint", str(stage1), "--shards", assets.val_pattern]
    with pytest.raises(ConfigError, match="1 inputs for 2 ranks"):
        check(parse_args([*args, "--limit", "1"]))
    assert len(check(parse_args([*args, "--limit", "2"]))[2].images) == 2


@pytest.mark.slow
def test_retrieval_from_a_karpathy_json_matches_the_library_and_two_ranks(assets, checkpoints, coco_like, tmp_path):
    stage1, _ = checkpoints
    args = ["retrieval", "--checkpoint", stage1, "--captions", coco_like / "karpathy.json", "--images", coco_like,
            "--k", 4]
    single = run_eval(*args, "--out", tmp_path / "one.json")
    assert single.returncode == 0, single.stderr[-3000:]
    assert "itm_t2i_r1" in single.stdout
    one = json.loads((tmp_path / "one.json").read_text())
    assert len(one["predictions"]["text_to_image"]) == 2 * IMAGES  # both captions of every image are queries

    # the same numbers straight from the library on the same features
    from blip2_ds.data.text import tokenize_batch
    from blip2_ds.eval.features import image_features
    from blip2_ds.eval.retrieval import retrieval_metrics
    from blip2_ds.models.stage1 import Stage1Model
    from blip2_ds.models.vision import build_vision_tower
    from blip2_ds.state_io import read_state_dict
    from blip2_ds.train.build import build_tokenizer

    cfg = load_config(stage1 / "config.yaml")
    images = read_caption_json(coco_like / "karpathy.json", coco_like)
    tower = build_vision_tower(cfg.vision)
    model = Stage1Model(cfg.model, cfg.objectives)
    model.load_state_dict(read_state_dict(stage1 / "model.safetensors"))
    with torch.no_grad():
        embeds = image_features(tower, images, cfg.data.image_size, "cpu")
    ids, mask = tokenize_batch(build_tokenizer(cfg), [c for i in images for c in i.captions], cfg.pretrained.max_text_len)
    expected = retrieval_metrics(model, embeds, ids, mask, torch.arange(IMAGES).repeat_interleave(2), k=4)
    for name, value in expected.items():
        assert abs(one["metrics"][name] - value) < 1e-6, name

    two = run_eval(*args, "--out", tmp_path / "two.json", ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two.json").read_text())["metrics"] == one["metrics"]


@pytest.mark.slow
def test_captioning_and_vqa_print_metrics_and_split_across_ranks(checkpoints, coco_like, tmp_path):
    _, stage2 = checkpoints
    caption_args = ["caption", "--checkpoint", stage2, "--captions", coco_like / "karpathy.json", "--images", coco_like]
    single = run_eval(*caption_args, "--out", tmp_path / "caption1.json")
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads((tmp_path / "caption1.json").read_text())
    assert {"Bleu_4", "CIDEr", "ROUGE_L"} <= set(one["metrics"]) and "CIDEr" in single.stdout
    assert [p["image"] for p in one["predictions"]] == [str(i + 1) for i in range(IMAGES)]
    assert all(isinstance(p["caption"], str) and len(p["references"]) == 2 for p in one["predictions"])
    two = run_eval(*caption_args, "--out", tmp_path / "caption2.json", ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "caption2.json").read_text())["predictions"] == one["predictions"]

    vqa_args = ["vqa", "--checkpoint", stage2, "--questions", coco_like / "questions.json",
                "--annotations", coco_like / "annotations.json", "--images", coco_like / "val2014"]
    run = run_eval(*vqa_args, "--out", tmp_path / "vqa.json")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "vqa.json").read_text())
    assert 0.0 <= result["metrics"]["accuracy"] <= 100.0 and "accuracy" in run.stdout
    assert len(result["predictions"]) == IMAGES
    # against ten identical answers a prediction scores 100 (it is "red") or 0
    for prediction in result["predictions"]:
        assert prediction["accuracy"] in (0.0, 100.0)


def test_vqa_questions_sharing_an_image_get_the_answers_of_separate_passes(checkpoints, coco_like):
    """One ViT pass per distinct image in a batch: the answers equal those of one question per batch."""
    from blip2_ds.eval import tasks
    from blip2_ds.trained import build_trained, load_checkpoint_config, resolve_weights

    _, stage2 = checkpoints
    cfg = load_checkpoint_config(resolve_weights(stage2))
    tower, model = build_trained(cfg, resolve_weights(stage2))
    base = read_vqa(coco_like / "questions.json", coco_like / "annotations.json", coco_like / "val2014")[:2]
    asked = [base[0], dataclasses.replace(base[0], question_id=99, question="what shape is it?"), base[1]]
    with torch.no_grad():
        together = tasks.vqa(model, tower, asked, cfg.data.image_size, "cpu", "Question: {} Answer:", cfg.generation, 8)
        alone = tasks.vqa(model, tower, asked, cfg.data.image_size, "cpu", "Question: {} Answer:", cfg.generation, 1)
    assert [p["answer"] for p in together["predictions"]] == [p["answer"] for p in alone["predictions"]]
