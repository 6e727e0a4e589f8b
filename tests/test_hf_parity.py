"""The project's Q-Former against Hugging Face's Blip2ForImageTextRetrieval, same weights."""
import torch
from conftest import random_text, tiny_qformer_config
from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2QFormerConfig, Blip2VisionConfig

from blip2_ds.convert import HF, OURS, convert
from blip2_ds.models.stage1 import Stage1Model

VOCAB = 30523


def randomize_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every tensor random (LayerNorm gains around 1), so a mis-mapped bias or norm shows."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm_gain = name.endswith("weight") and param.dim() == 1
            param.copy_(1.0 + 0.1 * noise if is_norm_gain else 0.1 * noise)


def build_pair(seed: int = 0):
    cfg = tiny_qformer_config(vocab_size=VOCAB)
    ours = Stage1Model(cfg).eval()
    generator = torch.Generator().manual_seed(seed)
    randomize_(ours, generator)
    hf_config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=cfg.vision_width, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=28, patch_size=14,
                                        layer_norm_eps=cfg.vision_norm_eps).to_dict(),
        qformer_config=Blip2QFormerConfig(
            vocab_size=VOCAB, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_position_embeddings, cross_attention_frequency=cfg.cross_attention_freq,
            encoder_hidden_size=cfg.vision_width, use_qformer_text_input=True, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, layer_norm_eps=cfg.layer_norm_eps).to_dict(),
        num_query_tokens=cfg.num_query_tokens, image_text_hidden_size=cfg.embed_dim,
    )
    hf = Blip2ForImageTextRetrieval(hf_config).eval()
    exported = convert(ours.state_dict(), OURS, HF)
    assert not exported.report.unexpected
    assert sorted(exported.extras) == sorted(["temp", "qformer.lm_head.bias", "qformer.lm_head.dense.bias",
                                              "qformer.lm_head.dense.weight", "qformer.lm_head.norm.bias",
                                              "qformer.lm_head.norm.weight"])
    missing, unexpected = hf.load_state_dict(exported.state_dict, strict=False)
    assert not unexpected
    assert all(k.startswith("vision_model.") and "post_layernorm" not in k for k in missing), missing
    return ours, hf, cfg


@torch.no_grad()
def _features_and_text(hf, cfg, batch=5, seed=1):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, 28, 28, generator=generator)
    # The frozen ViT's output before its final norm (HF's post_layernorm is BLIP-2's ln_vision).
    image_embeds = hf.vision_model.encoder(inputs_embeds=hf.vision_model.embeddings(pixels)).last_hidden_state
    ids, mask = random_text(batch, 12, VOCAB, generator)
    return pixels, image_embeds, ids, mask


def test_itm_logits_match_hf():
    ours, hf, cfg = build_pair()
    pixels, image_embeds, ids, mask = _features_and_text(hf, cfg)
    with torch.no_grad():
        expected = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                      use_image_text_matching_head=True).logits_per_image
        got = ours.itm_logits(image_embeds, ids, mask)
    assert got.shape == expected.shape == (5, 2)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert expected.std() > 1e-2  # a meaningful comparison, not two constants


def test_itc_similarities_match_hf():
    ours, hf, cfg = build_pair(seed=3)
    pixels, image_embeds, ids, mask = _features_and_text(hf, cfg, batch=6, seed=4)
    with torch.no_grad():
        expected = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                      use_image_text_matching_head=False).logits_per_image
        got = ours.image_text_similarity(image_embeds, ids, mask)
    assert got.shape == expected.shape == (6, 6)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert expected.std() > 1e-2


def test_hf_state_dict_imports_losslessly():
    ours, hf, cfg = build_pair(seed=5)
    hf_state = hf.state_dict()
    imported = convert(hf_state, HF, OURS)
    assert not imported.report.unexpected
    assert len(imported.frozen) == len([k for k in hf_state if k.startswith("vision_model.")]) - 2
    fresh = Stage1Model(cfg)
    missing, unexpected = fresh.load_state_dict(imported.state_dict, strict=False)
    assert not unexpected
    assert sorted(missing) == sorted(["temp", "qformer.lm_head.bias", "qformer.lm_head.dense.bias",
                                      "qformer.lm_head.dense.weight", "qformer.lm_head.norm.bias",
                                      "qformer.lm_head.norm.weight"])
    for name, tensor in imported.state_dict.items():
        torch.testing.assert_close(tensor, ours.state_dict()[name], rtol=0, atol=0)
    back = convert(imported.state_dict, OURS, HF, frozen=imported.frozen, frozen_format=imported.frozen_format)
    assert set(back.state_dict) | set(back.frozen) == set(hf_state)
    for name, tensor in {**back.state_dict, **back.frozen}.items():
        assert torch.equal(tensor, hf_state[name]), name
