"""LAVIS / HF state dicts into the project's model and back, by function and from the command line."""
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, random_text, subprocess_env, tiny_qformer_config
from transformers import BertConfig, BertForMaskedLM

from blip2_ds.convert import HF, LAVIS, OURS, check_against, convert
from blip2_ds.models import masks
from blip2_ds.models.stage1 import Stage1Model
from blip2_ds.state_io import read_state_dict


def lavis_stage1_state(cfg, seed=0):
    """A LAVIS ``blip2_pretrained.pth``-style state dict, named independently of the converter:
    the BERT part as transformers names it, the Q-Former additions as the reference note lists them."""
    torch.manual_seed(seed)
    bert = BertForMaskedLM(BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, layer_norm_eps=cfg.layer_norm_eps)).eval()
    with torch.no_grad():
        for name, param in bert.named_parameters():
            param.normal_(1.0 if "LayerNorm.weight" in name else 0.0, 0.1)
        bert.bert.embeddings.token_type_embeddings.weight.zero_()  # LAVIS has no token types
    state = {"Qformer." + k: v.clone() for k, v in bert.state_dict().items() if "token_type" not in k}
    h, w = cfg.hidden_size, cfg.vision_width
    rand = lambda *shape: torch.randn(*shape) * 0.1  # noqa: E731
    for i in range(cfg.num_layers):
        layer = f"Qformer.bert.encoder.layer.{i}"
        if i % cfg.cross_attention_freq == 0:
            for proj, width in (("query", h), ("key", w), ("value", w)):
                state[f"{layer}.crossattention.self.{proj}.weight"] = rand(h, width)
                state[f"{layer}.crossattention.self.{proj}.bias"] = rand(h)
            state[f"{layer}.crossattention.output.dense.weight"] = rand(h, h)
            state[f"{layer}.crossattention.output.dense.bias"] = rand(h)
            state[f"{layer}.crossattention.output.LayerNorm.weight"] = 1 + rand(h)
            state[f"{layer}.crossattention.output.LayerNorm.bias"] = rand(h)
        state[f"{layer}.intermediate_query.dense.weight"] = rand(cfg.intermediate_size, h)
        state[f"{layer}.intermediate_query.dense.bias"] = rand(cfg.intermediate_size)
        state[f"{layer}.output_query.dense.weight"] = rand(h, cfg.intermediate_size)
        state[f"{layer}.output_query.dense.bias"] = rand(h)
        state[f"{layer}.output_query.LayerNorm.weight"] = 1 + rand(h)
        state[f"{layer}.output_query.LayerNorm.bias"] = rand(h)
    state.update({
        "query_tokens": rand(1, cfg.num_query_tokens, h), "ln_vision.weight": 1 + rand(w), "ln_vision.bias": rand(w),
        "vision_proj.weight": rand(cfg.embed_dim, h), "vision_proj.bias": rand(cfg.embed_dim),
        "text_proj.weight": rand(cfg.embed_dim, h), "text_proj.bias": rand(cfg.embed_dim),
        "itm_head.weight": rand(2, h), "itm_head.bias": rand(2), "temp": torch.tensor(0.07),
        "visual_encoder.cls_token": rand(1, 1, w), "visual_encoder.blocks.0.attn.qkv.weight": rand(3 * w, w),
    })
    return state, bert


def test_lavis_import_is_complete_and_functionally_bert():
    cfg = tiny_qformer_config()
    lavis, bert = lavis_stage1_state(cfg)
    result = convert(lavis, LAVIS, OURS)
    model = Stage1Model(cfg).eval()
    check_against(result.report, result.state_dict, model)
    assert result.report.missing == [] and result.report.unexpected == [] and result.report.warnings == []
    assert sorted(result.frozen) == ["visual_encoder.blocks.0.attn.qkv.weight", "visual_encoder.cls_token"]
    model.load_state_dict(result.state_dict, strict=True)
    # Spot checks with the reference note's names.
    assert torch.equal(model.qformer.layers[2].cross_attn.key.weight,
                       lavis["Qformer.bert.encoder.layer.2.crossattention.self.key.weight"])
    assert torch.equal(model.qformer.layers[1].query_ffn.norm.bias,
                       lavis["Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias"])
    assert torch.equal(model.qformer.embed_norm.weight, lavis["Qformer.bert.embeddings.LayerNorm.weight"])
    # The text pass IS the BERT encoder, and the LM head IS BERT's prediction head.
    ids, mask = random_text(3, 7, cfg.vocab_size, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model.qformer(text_ids=ids, self_mask=masks.unimodal_text_mask(mask))
        expected = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        torch.testing.assert_close(ours, expected.hidden_states[-1], rtol=0, atol=1e-5)
        torch.testing.assert_close(model.qformer.lm_logits(ours), expected.logits, rtol=0, atol=1e-5)


def test_lavis_round_trip_loses_nothing():
    cfg = tiny_qformer_config()
    lavis, _ = lavis_stage1_state(cfg, seed=1)
    ours = convert(lavis, LAVIS, OURS)
    back = convert(ours.state_dict, OURS, LAVIS, frozen=ours.frozen, frozen_format=ours.frozen_format)
    restored = {**back.state_dict, **back.frozen}
    assert set(lavis) <= set(restored)
    assert set(restored) - set(lavis) <= {"Qformer.bert.embeddings.position_ids"}
    for name, tensor in lavis.items():
        assert torch.equal(restored[name], tensor), name


def test_report_names_missing_unexpected_and_stage2_keys():
    cfg = tiny_qformer_config()
    lavis, _ = lavis_stage1_state(cfg)
    del lavis["itm_head.weight"]
    lavis["opt_proj.weight"] = torch.zeros(3, 3)
    lavis["Qformer.bert.encoder.layer.0.attention.self.query.scale"] = torch.zeros(1)
    lavis["Qformer.cls.predictions.decoder.weight"] = lavis["Qformer.cls.predictions.decoder.weight"] + 1
    result = convert(lavis, LAVIS, OURS)
    check_against(result.report, result.state_dict, Stage1Model(cfg))
    assert result.report.missing == ["itm_head.weight"]
    assert result.report.unexpected == ["opt_proj.weight", "Qformer.bert.encoder.layer.0.attention.self.query.scale"]
    text = result.report.summary()
    assert "stage-2" in text and "decoder.weight differs" in text and "itm_head.weight" in text


def test_hf_export_keeps_lm_head_and_temperature_in_extras():
    cfg = tiny_qformer_config()
    model = Stage1Model(cfg)
    exported = convert(model.state_dict(), OURS, HF)
    assert "temp" in exported.extras and "qformer.lm_head.bias" in exported.extras
    back = convert(exported.state_dict, HF, OURS, extras=exported.extras)
    assert set(back.state_dict) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict[name], tensor), name


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "blip2_ds.convert", *map(str, args)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_command_line_round_trips(tmp_path):
    cfg = tiny_qformer_config()
    lavis, _ = lavis_stage1_state(cfg, seed=2)
    torch.save({"model": lavis}, tmp_path / "blip2_pretrained.pth")
    run = _cli("from-lavis", tmp_path / "blip2_pretrained.pth", tmp_path / "ours", "--num-heads", cfg.num_heads)
    assert run.returncode == 0, run.stderr
    assert "missing keys: 0" in run.stdout and "unexpected keys: 0" in run.stdout
    assert "frozen-tower tensors carried through unchanged: 2" in run.stdout
    assert (tmp_path / "ours" / "qformer_config.yaml").is_file()

    run = _cli("to-lavis", tmp_path / "ours", tmp_path / "back.pth")
    assert run.returncode == 0, run.stderr
    back = read_state_dict(tmp_path / "back.pth")
    for name, tensor in lavis.items():
        assert torch.equal(back[name], tensor), name

    run = _cli("to-hf", tmp_path / "ours", tmp_path / "hf")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "hf" / "blip2_ds_extras.safetensors").is_file()
    run = _cli("from-hf", tmp_path / "hf", tmp_path / "ours2", "--num-heads", cfg.num_heads)
    assert run.returncode == 0, run.stderr
    assert "missing keys: 0" in run.stdout
    first, second = read_state_dict(tmp_path / "ours" / "model.safetensors"), read_state_dict(tmp_path / "ours2" / "model.safetensors")
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)

    run = _cli("from-lavis", tmp_path / "nothing.pth", tmp_path / "x")
    assert run.returncode == 2 and "nothing.pth" in run.stderr


def test_lavis_training_checkpoint_with_python_objects_needs_trust(tmp_path):
    import argparse

    cfg = tiny_qformer_config()
    lavis, _ = lavis_stage1_state(cfg, seed=3)
    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": lavis, "config": argparse.Namespace(lr=1e-4), "epoch": 3}, path)
    with pytest.raises(ValueError, match="--trust-pickle"):
        read_state_dict(path)
    assert torch.equal(read_state_dict(path, trust_pickle=True)["temp"], lavis["temp"])
