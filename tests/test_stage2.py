"""Stage 2: the frozen LLM wrapper, the generative loss, generation, and init from stage-1 checkpoints.

The LLMs are tiny OPT / T5 folders written by ``tiny_llms`` (models and tokenizers made
offline) and read back through ``build_language_model``, exactly as a real checkpoint.
"""
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_qformer_config
from tiny_llms import HIDDEN, tiny_llm_dirs  # noqa: F401  (session fixture)

from blip2_ds.config import ConfigError, GenerationConfig, LanguageConfig, QFormerConfig
from blip2_ds.convert import convert
from blip2_ds.models.language import build_language_model
from blip2_ds.models.stage1 import Stage1Model
from blip2_ds.models.stage2 import Stage2Model, TextBatch, load_stage1_into_stage2

KINDS = ("opt", "t5")
CAPTIONS = ["a dog running on the grass", "three birds"]
PROMPT = "a photo of"


def stage2(dirs, kind, dtype="fp32", prompt=PROMPT, max_text_len=32, seed=0):
    llm = build_language_model(LanguageConfig(kind=kind, path=str(dirs[kind]), dtype=dtype, prompt=prompt,
                                              max_text_len=max_text_len))
    torch.manual_seed(seed)
    model = Stage2Model(tiny_qformer_config(), llm)
    with torch.no_grad():  # ln_vision away from its identity init, so that its gradient is not trivial
        model.ln_vision.weight.normal_(1.0, 0.1)
        model.ln_vision.bias.normal_(0.0, 0.1)
    return model


def images(batch=2, seed=1):
    return torch.randn(batch, 5, tiny_qformer_config().vision_width, generator=torch.Generator().manual_seed(seed))


def reference_soft_prompt(model, image_embeds):
    """Q-Former queries -> llm_proj, spelled out (ln_vision in fp32, as in stage 1)."""
    cfg = model.cfg
    normed = F.layer_norm(image_embeds.float(), (cfg.vision_width,), model.ln_vision.weight, model.ln_vision.bias,
                          cfg.vision_norm_eps)
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    hidden, _ = model.qformer(query_embeds=queries, image_kv=model.qformer.image_kv(normed))
    return model.llm_proj(hidden)


def test_opt_loss_matches_hand_computed_reference(tiny_llm_dirs):
    model = stage2(tiny_llm_dirs, "opt")
    tok, llm = model.llm.tokenizer, model.llm.model
    x = images()
    # OPT layout by hand: </s> + prompt, then " caption\n"; only the caption part has loss.
    head = [tok.bos_token_id] + tok(PROMPT, add_special_tokens=False).input_ids
    rows = [head + tok(" " + c + "\n", add_special_tokens=False).input_ids for c in CAPTIONS]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    text_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    text = model.tokenize(CAPTIONS)
    assert torch.equal(text.input_ids, ids) and torch.equal(text.attention_mask, text_mask)
    assert (text.labels[:, : len(head)] == -100).all()  # bos + prompt: no loss
    assert torch.equal(text.labels != -100, (text_mask == 1) & (torch.arange(width) >= len(head)))
    assert tok.decode(ids[0][text.labels[0] != -100]) == " a dog running on the grass\n"

    with torch.no_grad():
        soft = reference_soft_prompt(model, x)
        q = soft.shape[1]
        logits = llm(inputs_embeds=torch.cat([soft, llm.get_input_embeddings()(ids)], 1),
                     attention_mask=torch.cat([torch.ones(2, q, dtype=torch.long), text_mask], 1)).logits
        labels = torch.cat([torch.full((2, q), -100), ids.masked_fill(text_mask == 0, -100)], 1)
        labels[:, q: q + len(head)] = -100
        expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        assert labels.ne(-100).sum() == sum(len(r) - len(head) for r in rows)
        torch.testing.assert_close(model(x, CAPTIONS), expected, rtol=1e-5, atol=1e-5)
        assert isinstance(text, TextBatch)
        torch.testing.assert_close(model(x, text), expected, rtol=1e-5, atol=1e-5)  # pre-tokenized input


def test_t5_loss_matches_hand_computed_reference(tiny_llm_dirs):
    model = stage2(tiny_llm_dirs, "t5")
    tok, llm = model.llm.tokenizer, model.llm.model
    x = images()
    prefix = tok(PROMPT).input_ids  # prompt + </s>, after the soft prompt in the encoder
    targets = [tok(c).input_ids for c in CAPTIONS]  # caption + </s>
    assert prefix[-1] == targets[0][-1] == tok.eos_token_id
    width = max(map(len, targets))
    labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
    text = model.tokenize(CAPTIONS)
    assert torch.equal(text.labels, labels) and text.input_ids.tolist() == [prefix, prefix]

    with torch.no_grad():
        soft = reference_soft_prompt(model, x)
        encoder = torch.cat([soft, llm.get_input_embeddings()(torch.tensor([prefix, prefix]))], 1)
        decoder_ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), labels[:, :-1].clamp(min=0)], 1)  # start = pad 0
        logits = llm(inputs_embeds=encoder, attention_mask=torch.ones(encoder.shape[:2], dtype=torch.long),
                     decoder_input_ids=decoder_ids).logits
        expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        torch.testing.assert_close(model(x, text), expected, rtol=1e-5, atol=1e-5)


def test_flant5_runs_its_gated_gelu_exactly_as_blip2_did(tmp_path):
    """FlanT5 folders say gated-gelu (tanh-approximated "gelu_new"); LAVIS and HF's BLIP-2 run it with the
    exact GELU. A ReLU T5 (v1.0) keeps its own activation."""
    from tiny_llms import make_t5_folder

    x = torch.linspace(-4, 4, 101)
    for proj, expected in (("gated-gelu", F.gelu(x)), ("relu", F.relu(x))):
        llm = build_language_model(LanguageConfig(kind="t5", path=str(make_t5_folder(tmp_path / proj, proj)),
                                                  dtype="fp32"))
        activation = llm.model.encoder.block[0].layer[1].DenseReluDense.act
        assert torch.equal(activation(x), expected), proj
    assert llm.model.config.dense_act_fn == "relu"


def test_t5_prefix_lm_split(tiny_llm_dirs):
    """The paper's prefix-LM: a random word boundary splits each caption into encoder prefix and target."""
    import random

    model = stage2(tiny_llm_dirs, "t5")
    caption = CAPTIONS[0] + " " + CAPTIONS[1]
    splits = set()
    for seed in range(30):
        text = model.tokenize([caption], random.Random(seed))
        tok = model.llm.tokenizer
        prefix = tok.decode(text.input_ids[0], skip_special_tokens=True)
        suffix = tok.decode(text.labels[0][text.labels[0] != -100], skip_special_tokens=True)
        assert prefix.startswith(PROMPT) and suffix
        assert (prefix[len(PROMPT):] + " " + suffix).split() == caption.split()
        splits.add(len(suffix.split()))
    assert len(splits) > 3  # the boundary varies
    x = images(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x, [caption], sample_seed=3),
                                   model(x, model.tokenize([caption], random.Random(3))))


def test_opt_scores_the_bos_without_a_prompt(tiny_llm_dirs):
    model = stage2(tiny_llm_dirs, "opt", prompt="")
    text = model.tokenize(CAPTIONS)
    assert (text.input_ids[:, 0] == model.llm.tokenizer.bos_token_id).all()
    assert (text.labels[:, 0] == text.input_ids[:, 0]).all()  # as the original: no prompt, nothing masked


@pytest.mark.parametrize("kind", KINDS)
def test_truncation_to_max_text_len(tiny_llm_dirs, kind):
    model = stage2(tiny_llm_dirs, kind, max_text_len=10)
    text = model.tokenize(["a man holding an umbrella in the rain " * 3, "a cat"])
    assert text.labels.shape[1] == 10 and (text.labels[1] == -100).any()  # longest row cut, short row padded
    assert torch.isfinite(model(images(), text))
    if kind == "opt":
        with pytest.raises(ConfigError, match="language.max_text_len=4 leaves no room"):
            stage2(tiny_llm_dirs, kind, max_text_len=4).tokenize(["a cat"])


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_reaches_trainable_parts_only(tiny_llm_dirs, kind):
    model = stage2(tiny_llm_dirs, kind).train()
    model(images(), CAPTIONS).backward()
    trainable = dict(model.named_parameters())
    assert {name.split(".")[0] for name in trainable} == {"query_tokens", "ln_vision", "qformer", "llm_proj"}
    for name, param in trainable.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert model.trainable_parameters() == list(trainable.values())
    for name, param in model.llm.model.named_parameters():
        assert not param.requires_grad and param.grad is None, name
    llm_ids = {id(p) for p in model.llm.model.parameters()}
    assert not llm_ids & {id(p) for p in model.parameters()}
    assert {name.split(".")[0] for name in model.state_dict()} == {"query_tokens", "ln_vision", "qformer", "llm_proj"}


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_llm_is_bf16_and_stays_in_eval(tiny_llm_dirs, kind):
    model = stage2(tiny_llm_dirs, kind, dtype="bf16")
    for name, param in model.llm.model.named_parameters():
        assert param.dtype == torch.bfloat16 and param.element_size() == 2 and not param.requires_grad, name
    model.train()
    model.llm.train()
    assert model.training and not model.llm.training
    assert not any(module.training for module in model.llm.model.modules())
    assert model.query_tokens.dtype == torch.float32  # the trainable part keeps its own dtype
    loss = model(images(), CAPTIONS)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.llm_proj.weight.grad is not None
    model.to(torch.float64)  # a dtype change is for the trainable part; the LLM keeps its storage dtype
    assert model.query_tokens.dtype == torch.float64 and model.llm.dtype == torch.bfloat16
    assert torch.isfinite(model(images().double(), CAPTIONS))


def force_end_token(model, boost=1e4):
    """Make the LLM's first end token the overwhelming favourite at every step."""
    head = model.llm.model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[model.llm.end_token_ids[0]] = boost
    biased.requires_grad_(False)
    model.llm.model.set_output_embeddings(biased)


SETTINGS = {
    "beam": GenerationConfig(num_beams=3, num_captions=2, max_new_tokens=7, min_new_tokens=3),
    "nucleus": GenerationConfig(use_nucleus_sampling=True, top_p=0.9, temperature=0.8, num_captions=3,
                                max_new_tokens=7, min_new_tokens=3),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("kind", KINDS)
def test_generation_respects_lengths_and_counts(tiny_llm_dirs, kind, setting):
    gen = SETTINGS[setting]
    model = stage2(tiny_llm_dirs, kind).eval()
    x = images(batch=2)
    torch.manual_seed(0)
    ids = model.generate_ids(x, gen=gen)  # an ordinary random LLM: rarely ends early
    assert ids.shape[0] == 2 * gen.num_captions and ids.shape[1] <= gen.max_new_tokens
    texts = model.generate(x, gen=gen)
    assert len(texts) == 2 * gen.num_captions and all(isinstance(t, str) and t == t.strip() for t in texts)

    force_end_token(model)  # now it wants to stop at once: min_new_tokens must hold it back
    ends = torch.tensor(model.llm.end_token_ids)
    ids = model.generate_ids(x, gen=gen)
    assert ids.shape[0] == 2 * gen.num_captions
    for row in ids:
        is_end = torch.isin(row, ends)
        assert not is_end[: gen.min_new_tokens].any() and is_end[gen.min_new_tokens], row
    free = GenerationConfig(**{**vars(gen), "min_new_tokens": 0})
    best = model.generate_ids(x, gen=free)[:: gen.num_captions]  # without a minimum: the end token at once
    assert torch.isin(best[:, 0], ends).all()
    assert model.generate(x, gen=free)[:: gen.num_captions] == ["", ""]


def greedy_reference(model, image_embeds, prompts, steps):
    """Token-by-token argmax with full forwards (no cache), one image at a time, prompt spelled out."""
    llm, tok = model.llm.model, model.llm.tokenizer
    embed = llm.get_input_embeddings()
    ends = model.llm.end_token_ids
    out = []
    with torch.no_grad():
        soft = reference_soft_prompt(model, image_embeds)
        for i, prompt in enumerate(prompts):
            new = []
            if model.llm.kind == "opt":
                head = [tok.bos_token_id] + tok(prompt, add_special_tokens=False).input_ids
                for _ in range(steps):
                    seq = torch.cat([soft[i: i + 1], embed(torch.tensor([head + new]))], 1)
                    new.append(int(llm(inputs_embeds=seq).logits[0, -1].argmax()))
                    if new[-1] in ends:
                        break
            else:
                encoder = torch.cat([soft[i: i + 1], embed(torch.tensor([tok(prompt).input_ids]))], 1)
                for _ in range(steps):
                    decoder = torch.tensor([[llm.config.decoder_start_token_id] + new])
                    new.append(int(llm(inputs_embeds=encoder, decoder_input_ids=decoder).logits[0, -1].argmax()))
                    if new[-1] in ends:
                        break
            out.append(new)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_generation_continues_the_prompt(tiny_llm_dirs, kind):
    """Greedy generation equals a by-hand argmax over [soft prompt; text prompt]; prompts of
    different lengths in one batch (OPT: padded on the left) and the config's default prompt."""
    model = stage2(tiny_llm_dirs, kind).eval()
    x = images(batch=3)
    gen = GenerationConfig(num_beams=1, max_new_tokens=5, min_new_tokens=0, repetition_penalty=1.0)
    prompts = ["a photo of", "question: what is on the table? answer:", ""]
    for asked, used in ((prompts, prompts), (None, [PROMPT] * 3)):
        ids = model.generate_ids(x, prompt=asked, gen=gen)
        got = []
        for row in ids.tolist():
            ends = [i for i, t in enumerate(row) if t in model.llm.end_token_ids]
            got.append(row[: ends[0] + 1] if ends else row)
        assert got == greedy_reference(model, x, used, steps=5)
    texts = model.generate(x, prompt=prompts, gen=gen)  # new tokens only: the prompt is not repeated
    tok = model.llm.tokenizer
    assert texts == [tok.decode(r, skip_special_tokens=True).strip() for r in model.generate_ids(x, prompts, gen)]
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        model.generate(x, prompt=prompts[:2], gen=gen)
    with pytest.raises(ValueError, match="num_captions=2 exceeds generation.num_beams=1"):
        model.generate(x, gen=GenerationConfig(num_beams=1, num_captions=2))


def stage1_state(cfg):
    torch.manual_seed(3)
    model = Stage1Model(cfg)
    with torch.no_grad():
        model.ln_vision.weight.normal_()  # distinguishable from a fresh LayerNorm
    return model.state_dict()


TEXT_PARTS = ("qformer.word_embeddings.weight", "qformer.position_embeddings.weight", "qformer.lm_head.dense.weight",
              "qformer.lm_head.bias", "qformer.layers.0.text_ffn.up.weight", "qformer.layers.3.text_ffn.norm.bias",
              "vision_proj.weight", "text_proj.bias", "itm_head.weight", "temp")


@pytest.mark.parametrize("fmt", ["ours", "lavis", "hf"])
def test_stage1_checkpoint_initialises_stage2(fmt):
    cfg = tiny_qformer_config()
    source = stage1_state(cfg)
    projection = {"weight": torch.randn(HIDDEN, cfg.hidden_size), "bias": torch.randn(HIDDEN)}
    if fmt == "ours":
        state = dict(source)
    else:
        state = convert(source, "ours", fmt).state_dict
        prefix = {"lavis": "opt_proj.", "hf": "language_projection."}[fmt]
        state.update({prefix + k: v for k, v in projection.items()})
        state[{"lavis": "opt_model.lm_head.weight", "hf": "language_model.lm_head.weight"}[fmt]] = torch.zeros(3, 3)
    model = Stage2Model(cfg, llm_hidden=HIDDEN)
    report = load_stage1_into_stage2(model, state, fmt=fmt)
    loaded = model.state_dict()
    for name in report.loaded:
        expected = source[name] if name in source else projection[name.split(".")[-1]]
        assert torch.equal(loaded[name], expected), name
    assert set(report.loaded) | set(report.missing) == set(loaded)
    if fmt == "ours":
        assert report.missing == ["llm_proj.bias", "llm_proj.weight"]
        assert set(TEXT_PARTS) <= set(report.dropped)
        assert "stage-1 text parts" in report.summary()
    else:
        assert report.missing == [] and "llm_proj.weight" in report.loaded
        assert any(name.endswith("lm_head.weight") for name in report.dropped)  # the LLM's own weights
        assert any("word_embeddings" in name for name in report.dropped)
    assert not any("text_ffn" in name or "word_embeddings" in name for name in report.loaded)
    again = load_stage1_into_stage2(Stage2Model(cfg, llm_hidden=HIDDEN), model.state_dict())  # a stage-2 checkpoint
    assert again.missing == again.dropped == [] and len(again.loaded) == len(loaded)


def test_stage1_checkpoint_that_does_not_fit():
    cfg = tiny_qformer_config()
    with pytest.raises(ValueError, match="qformer.embed_norm.weight"):
        load_stage1_into_stage2(Stage2Model(tiny_qformer_config(hidden_size=48), llm_hidden=HIDDEN), stage1_state(cfg))
    with pytest.raises(ValueError, match="no Q-Former tensor"):  # LAVIS names read as ours
        lavis = convert(stage1_state(cfg), "ours", "lavis").state_dict
        load_stage1_into_stage2(Stage2Model(cfg, llm_hidden=HIDDEN), lavis)
    with pytest.raises(ValueError, match="fmt="):
        load_stage1_into_stage2(Stage2Model(cfg, llm_hidden=HIDDEN), {}, fmt="pth")


def test_bad_llm_folders(tiny_llm_dirs, tmp_path):
    opt = tiny_llm_dirs["opt"]
    cases = {"no_path": None, "absent": tmp_path / "absent", "empty": tmp_path / "empty",
             "no_weights": tmp_path / "no_weights", "no_tokenizer": tmp_path / "no_tokenizer"}
    (tmp_path / "empty").mkdir()
    for name, files in (("no_weights", ["config.json", "tokenizer.json", "tokenizer_config.json"]),
                        ("no_tokenizer", ["config.json", "model.safetensors"])):
        (tmp_path / name).mkdir()
        for file in files:
            shutil.copy(opt / file, tmp_path / name / file)
    expected = {"no_path": "language.path is not set", "absent": "not a local directory",
                "empty": "config.json is missing", "no_weights": "no weights", "no_tokenizer": "no tokenizer"}
    for name, path in cases.items():
        with pytest.raises(ConfigError) as err:
            build_language_model(LanguageConfig(kind="opt", path=None if path is None else str(path)))
        assert expected[name] in str(err.value)
        if path is not None:
            assert f"language.path={path}" in str(err.value)
    with pytest.raises(ConfigError, match=r"language.kind='t5' .* holds a 'opt' model"):
        build_language_model(LanguageConfig(kind="t5", path=str(opt)))
    with pytest.raises(ConfigError, match=r"language.kind='opt' .* holds a 't5' model"):
        build_language_model(LanguageConfig(kind="opt", path=str(tiny_llm_dirs["t5"])))
    with pytest.raises(ConfigError, match="language.kind"):
        build_language_model(LanguageConfig(kind="gpt2", path=str(opt)))


def test_trainable_count_vit_g_opt_2_7b_on_meta():
    """ViT-g (1408) + OPT-2.7B (2560): Q-Former without text parts, queries, ln_vision, projection."""
    with torch.device("meta"):
        model = Stage2Model(QFormerConfig(), llm_hidden=2560)
    assert all(p.is_meta for p in model.parameters())
    assert model.num_trainable_parameters() == 107_133_696  # "107.1M"
    assert sum(p.numel() for p in model.qformer.parameters()) == 105_137_664
    assert model.llm_proj.weight.shape == (2560, 768) and model.llm is None
    with pytest.raises(RuntimeError, match="without its LLM"):
        model.tokenize(["a cat"])


def test_hf_blip2_checkpoint_gives_hfs_soft_prompt():
    """A transformers Blip2ForConditionalGeneration state dict loads completely, and our soft prompt
    equals HF's ``language_projection(qformer(queries, post_layernorm(image)))``."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig,
                              OPTConfig)

    cfg = tiny_qformer_config(vision_norm_eps=1e-6)  # HF's post_layernorm eps (the original's ln_vision: 1e-5)
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=cfg.vision_width, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=4, image_size=28, patch_size=14,
                                        layer_norm_eps=1e-6).to_dict(),
        qformer_config=Blip2QFormerConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
            encoder_hidden_size=cfg.vision_width, cross_attention_frequency=cfg.cross_attention_freq).to_dict(),
        text_config=OPTConfig(vocab_size=50, hidden_size=HIDDEN, word_embed_proj_dim=HIDDEN, num_hidden_layers=1,
                              ffn_dim=32, num_attention_heads=4).to_dict(),
        num_query_tokens=cfg.num_query_tokens)).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(1.0 if param.dim() == 1 else 0.0, 0.1)
    model = Stage2Model(cfg, llm_hidden=HIDDEN).eval()
    report = load_stage1_into_stage2(model, hf.state_dict(), fmt="hf")
    assert report.missing == [] and all(n.startswith(("vision_model.", "language_model.")) for n in report.dropped)
    x = images()
    with torch.no_grad():
        queries = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1),
                             encoder_hidden_states=hf.vision_model.post_layernorm(x)).last_hidden_state
        torch.testing.assert_close(model.soft_prompt(x), hf.language_projection(queries), rtol=0, atol=1e-5)
