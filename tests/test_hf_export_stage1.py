"""Stage 1 -> Hugging Face Blip2ForImageTextRetrieval and back (blip2_ds/hf_export.py export_stage1 / import_stage1).

Tiny, offline, fp32: the tiny timm EVA of tests/tiny_towers.py, a tiny Q-Former whose ``ln_vision`` epsilon
is the tower's (so HF's post_layernorm is exact) and a tiny BERT WordPiece tokenizer folder (as
blip2_ds/demo_assets.py builds one). HF must compute what the project computes, to float rounding.
"""
import json

import pytest
import torch
import yaml
from conftest import random_text, tiny_qformer_config
from tiny_towers import DEPTH, SIZE, WIDTH, perturb
from tiny_towers import export_tower_config as tower_config

from blip2_ds.config import Config, PretrainedConfig, to_dict
from blip2_ds.convert import EXTRAS_FILE
from blip2_ds.convert import main as convert_main
from blip2_ds.data.text import tokenize_batch
from blip2_ds.demo_assets import wordpiece_vocab, write_wordpiece_tokenizer
from blip2_ds.hf_export import TOWER_FILE, export_stage1, import_stage1
from blip2_ds.models.pretrained import load_tokenizer
from blip2_ds.models.stage1 import Stage1Model
from blip2_ds.models.vision import build_vision_tower
from blip2_ds.state_io import read_state_dict, write_safetensors

MAX_TEXT_LEN = 12
WORDS = ["a", "dog", "cat", "running", "on", "the", "grass", "three", "birds", "red", "ball", "photo", "of"]


def make_tokenizer(out) -> int:
    """A lowercase BERT WordPiece folder ([PAD] = 0); returns the vocabulary size with [DEC]."""
    write_wordpiece_tokenizer(out, wordpiece_vocab(WORDS))
    return len(load_tokenizer(out))


def build(tmp_path, kind="eva", **qformer):
    tokenizer_dir = tmp_path / "bert-tokenizer"
    vocab = make_tokenizer(tokenizer_dir)
    tower = build_vision_tower(tower_config(tmp_path, kind))
    perturb(tower, 1)
    torch.manual_seed(0)
    model = Stage1Model(tiny_qformer_config(vision_width=WIDTH, vocab_size=vocab, **qformer), kernels="torch")
    perturb(model, 2)
    return tower, model.eval(), tokenizer_dir


def pixels(batch):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(tower, model, tokenizer folder, HF folder); ln_vision eps = the tower's (1e-6), so HF is exact."""
    root = tmp_path_factory.mktemp("hf_export_stage1")
    tower, model, tokenizer_dir = build(root, vision_norm_eps=1e-6)
    report = export_stage1(model, tower, root / "hf", tokenizer_dir, MAX_TEXT_LEN)
    assert report.warnings == [], report.summary()
    return tower, model, tokenizer_dir, root / "hf"


@pytest.fixture(scope="module")
def hf_model(exported):
    from transformers import Blip2ForImageTextRetrieval

    model, info = Blip2ForImageTextRetrieval.from_pretrained(exported[3], output_loading_info=True,
                                                            dtype=torch.float32)
    return model.eval(), info


def test_hf_loads_the_export_without_missing_or_unexpected_keys(exported, hf_model):
    from transformers import AutoProcessor, AutoTokenizer

    tower, model, tokenizer_dir, folder = exported
    hf, info = hf_model
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.vision_config.num_hidden_layers == DEPTH - 1  # the blocks the tower runs
    assert hf.config.image_text_hidden_size == model.cfg.embed_dim and hf.config.image_token_index is None
    assert hf.config.qformer_config.use_qformer_text_input
    assert torch.equal(hf.itm_head.weight, model.itm_head.weight)
    assert torch.equal(hf.embeddings.word_embeddings.weight, model.qformer.word_embeddings.weight)
    assert sorted(read_state_dict(folder / EXTRAS_FILE)) == sorted(
        ["temp", "qformer.lm_head.bias", "qformer.lm_head.dense.bias", "qformer.lm_head.dense.weight",
         "qformer.lm_head.norm.bias", "qformer.lm_head.norm.weight"])
    # The tokenizer is the training one ([DEC] included, no <image>), the processor tokenizes like training.
    ours_tok = load_tokenizer(tokenizer_dir, max_length=MAX_TEXT_LEN)
    theirs_tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert theirs_tok.get_vocab() == ours_tok.get_vocab() and len(theirs_tok) == model.cfg.vocab_size
    assert theirs_tok.bos_token == "[DEC]"
    processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    image = (torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    captions = ["A dog running on the grass!", "three red birds"]
    batch = processor(images=[image, image], text=captions, padding="max_length", truncation=True,
                      return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE)
    ids, mask = tokenize_batch(ours_tok, captions, MAX_TEXT_LEN)
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)


def _inputs(model, batch, seed):
    ids, mask = random_text(batch, MAX_TEXT_LEN, model.cfg.vocab_size, torch.Generator().manual_seed(seed))
    return pixels(batch), ids, mask


@pytest.mark.parametrize("head, seed", [("itm", 4), ("itc", 5)])
def test_itm_logits_and_itc_similarities_match(exported, hf_model, head, seed):
    tower, model, _, _ = exported
    hf, _ = hf_model
    x, ids, mask = _inputs(model, 3, seed)
    with torch.no_grad():
        ours = (model.itm_logits if head == "itm" else model.image_text_similarity)(tower(x), ids, mask)
        theirs = hf(pixel_values=x, input_ids=ids, attention_mask=mask, use_image_text_matching_head=head == "itm")
    assert ours.shape == theirs.logits_per_image.shape == ((3, 2) if head == "itm" else (3, 3))
    torch.testing.assert_close(theirs.logits_per_image, ours, rtol=0, atol=1e-4)
    assert ours.std() > 1e-2  # a meaningful comparison, not two constants


def _assert_same(back: dict, expected: dict) -> None:
    assert set(back) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name


def test_round_trip_reproduces_every_tensor(exported, tmp_path):
    tower, model, _, folder = exported
    report = import_stage1(folder, tmp_path / "back")
    assert report.missing == [] and report.unexpected == [], report.summary()
    _assert_same(read_state_dict(tmp_path / "back" / "model.safetensors"), model.state_dict())
    _assert_same(read_state_dict(tmp_path / "back" / TOWER_FILE), tower.encoder.state_dict())
    assert yaml.safe_load((tmp_path / "back" / "qformer_config.yaml").read_text()) == vars(model.cfg)
    # The tower file is a usable vision.checkpoint.
    again = build_vision_tower(tower_config(tmp_path, checkpoint=str(tmp_path / "back" / TOWER_FILE)))
    _assert_same(again.encoder.state_dict(), tower.encoder.state_dict())


def test_command_line_round_trip_from_a_stage1_checkpoint(tmp_path, capsys):
    """``to-hf`` of a stage-1 checkpoint folder (model.safetensors + config.yaml); ln_vision keeps the default
    1e-5 epsilon, which HF cannot hold apart from the tower's 1e-6: reported. ``from-hf`` gives it back."""
    tower, model, tokenizer_dir = build(tmp_path)
    write_safetensors(tower.encoder.state_dict(), tmp_path / "eva.safetensors")
    cfg = Config(model=model.cfg, vision=tower_config(tmp_path, checkpoint=str(tmp_path / "eva.safetensors")),
                 pretrained=PretrainedConfig(tokenizer_path=str(tokenizer_dir), max_text_len=MAX_TEXT_LEN), stage=1)
    ckpt = tmp_path / "step_00000010"
    write_safetensors(model.state_dict(), ckpt / "model.safetensors", {"format": "ours"})
    cfg.data.image_size = cfg.vision.image_size  # as a trainer's checkpoint has it
    (ckpt / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    assert convert_main(["to-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    assert "epsilon 1e-05 becomes 1e-06" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [
        "Blip2ForImageTextRetrieval"]
    assert convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    out = capsys.readouterr().out
    assert "missing keys: 0" in out and "unexpected keys: 0" in out
    _assert_same(read_state_dict(tmp_path / "back" / "model.safetensors"), model.state_dict())
    _assert_same(read_state_dict(tmp_path / "back" / TOWER_FILE), tower.encoder.state_dict())


def test_towers_hf_cannot_express_are_refused(tmp_path):
    tower, model, tokenizer_dir = build(tmp_path, kind="open_clip")
    with pytest.raises(ValueError, match="only timm Eva towers .*EVA01-g-14"):
        export_stage1(model, tower, tmp_path / "hf", tokenizer_dir)
    assert not (tmp_path / "hf").exists()


def test_a_tokenizer_of_another_vocabulary_is_refused(tmp_path):
    tower, model, tokenizer_dir = build(tmp_path, vision_norm_eps=1e-6)
    model.cfg.vocab_size += 1  # as if trained with another tokenizer
    with pytest.raises(ValueError, match="vocab_size"):
        export_stage1(model, tower, tmp_path / "hf", tokenizer_dir)
