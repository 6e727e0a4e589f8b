"""Stage 2 -> Hugging Face Blip2ForConditionalGeneration and back (blip2_ds/hf_export.py).

Tiny, offline: the tiny timm EVA tower of tests/tiny_towers.py (eva_giant_patch14_224 with small
kwargs, built by ``build_vision_tower`` from a custom model-config JSON), a tiny
Q-Former, and the tiny OPT of tests/tiny_llms.py. Everything in fp32, so HF must match exactly
(to float rounding) what the project computes.
"""
import pytest
import torch
from conftest import tiny_qformer_config
from tiny_llms import tiny_llm_dirs  # noqa: F401  (session fixture)
from tiny_towers import DEPTH, SIZE, WIDTH, perturb
from tiny_towers import export_tower_config as tower_config

from blip2_ds.config import GenerationConfig, LanguageConfig
from blip2_ds.convert import main as convert_main
from blip2_ds.hf_export import IMAGE_TOKEN, LLM_DIR, TOWER_FILE, check_exportable_tower, export_stage2, import_stage2
from blip2_ds.models.language import build_language_model
from blip2_ds.models.stage2 import Stage2Model
from blip2_ds.models.vision import build_vision_tower
from blip2_ds.state_io import read_state_dict, write_safetensors

PROMPT = "a photo of"


def language_config(dirs) -> LanguageConfig:
    return LanguageConfig(kind="opt", path=str(dirs["opt"]), dtype="fp32", prompt=PROMPT)


def build(tmp_path, dirs, kind="eva", **qformer):
    tower = build_vision_tower(tower_config(tmp_path, kind))
    perturb(tower, 1)
    torch.manual_seed(0)
    model = Stage2Model(tiny_qformer_config(vision_width=WIDTH, **qformer), build_language_model(language_config(dirs)))
    perturb(model, 2)
    return tower, model.eval()


def pixels(batch=2):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llm_dirs):  # noqa: F811
    """(tower, model, folder): one export shared by the tests. ln_vision eps = the tower's (1e-6), so HF is exact."""
    root = tmp_path_factory.mktemp("hf_export")
    tower, model = build(root, tiny_llm_dirs, vision_norm_eps=1e-6)
    report = export_stage2(model, tower, root / "hf")
    assert report.warnings == [], report.summary()
    return tower, model, root / "hf"


@pytest.fixture(scope="module")
def hf_model(exported):
    from transformers import Blip2ForConditionalGeneration

    model, info = Blip2ForConditionalGeneration.from_pretrained(exported[2], output_loading_info=True,
                                                               dtype=torch.float32)
    return model.eval(), info


def test_hf_loads_the_export_without_missing_or_unexpected_keys(exported, hf_model):
    from transformers import Blip2Processor

    tower, model, folder = exported
    hf, info = hf_model
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.vision_config.num_hidden_layers == DEPTH - 1  # the blocks the tower runs
    assert torch.equal(hf.language_projection.weight, model.llm_proj.weight)
    processor = Blip2Processor.from_pretrained(folder)
    image = (torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    batch = processor(images=image, text=PROMPT, return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, SIZE, SIZE)
    image_id = hf.config.image_token_index
    ids = batch["input_ids"][0].tolist()
    q = model.cfg.num_query_tokens
    assert ids[:q] == [image_id] * q and ids[q:] == model.text_tokenizer().prompt_ids(PROMPT)


def test_vision_features_and_lm_logits_match(exported, hf_model):
    tower, model, _ = exported
    hf, _ = hf_model
    x = pixels()
    text = model.tokenize(["a dog running on the grass", "three birds"])
    q = model.cfg.num_query_tokens
    with torch.no_grad():
        ours_vision = model.vision_states(tower(x))
        torch.testing.assert_close(hf.vision_model(x).last_hidden_state, ours_vision, rtol=0, atol=1e-5)

        llm = model.llm.model
        mask = torch.cat([torch.ones(2, q, dtype=torch.long), text.attention_mask], 1)
        ours = llm(inputs_embeds=torch.cat([model.soft_prompt(tower(x)), model.llm.embed(text.input_ids)], 1),
                   attention_mask=mask).logits
        ids = torch.cat([torch.full((2, q), hf.config.image_token_index), text.input_ids], 1)
        theirs = hf(pixel_values=x, input_ids=ids, attention_mask=mask).logits
    vocab = ours.shape[-1]
    real = mask.bool()
    torch.testing.assert_close(theirs[..., :vocab][real], ours[real], rtol=0, atol=1e-4)
    # The placeholder's added row (zeros): logit 0, suppressed by the exported generation config.
    assert theirs.shape[-1] == vocab + 1 and (theirs[..., vocab:] == 0).all()


@pytest.mark.parametrize("prompt", ["", PROMPT])
@pytest.mark.parametrize("beams", [1, 3])
def test_generation_is_identical(exported, hf_model, prompt, beams):
    """Same soft prompt, ``</s>``, prompt tokens and end tokens ("\\n", ``</s>``): same ids.

    HF's generate returns the prompt ids before the new tokens; the project returns new tokens
    only, so HF's output is compared after the prompt. The repetition penalty is 1: HF counts
    the prompt ids in it, the project does not (see hf_export._generation_config).
    """
    tower, model, _ = exported
    hf, _ = hf_model
    x = pixels()
    gen = GenerationConfig(num_beams=beams, max_new_tokens=8, min_new_tokens=0, repetition_penalty=1.0)
    ours = model.generate_ids(tower(x), prompt=prompt, gen=gen)
    q, image_id = model.cfg.num_query_tokens, hf.config.image_token_index
    options = dict(num_beams=beams, do_sample=False, max_new_tokens=8, min_new_tokens=0, repetition_penalty=1.0)
    if prompt:
        ids = torch.tensor([[image_id] * q + model.text_tokenizer().prompt_ids(prompt)] * 2)
        theirs = hf.generate(pixel_values=x, input_ids=ids, attention_mask=torch.ones_like(ids), **options)
        start = ids.shape[1]
    else:  # HF's default start: the placeholders + the LLM's bos (</s>), as the project's [soft; </s>]
        theirs = hf.generate(pixel_values=x, **options)
        start = q + 1
    assert torch.equal(theirs[:, :start][:, q:], torch.tensor([model.text_tokenizer().prompt_ids(prompt)] * 2))
    new = theirs[:, start:]
    assert new.shape[1] > 0 and torch.equal(new, ours), (new, ours)


def test_round_trip_reproduces_every_tensor(exported, tmp_path):
    tower, model, folder = exported
    report = import_stage2(folder, tmp_path / "back")
    assert report.missing == [] and report.unexpected == [], report.summary()
    back = read_state_dict(tmp_path / "back" / "model.safetensors")
    expected = model.state_dict()
    assert set(back) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name
    timm_back = read_state_dict(tmp_path / "back" / TOWER_FILE)
    assert set(timm_back) == set(tower.encoder.state_dict())
    for name, tensor in tower.encoder.state_dict().items():
        assert torch.equal(timm_back[name], tensor), name
    # The LLM folder loads as this project's frozen LLM, with the original weights.
    llm = build_language_model(LanguageConfig(kind="opt", path=str(tmp_path / "back" / LLM_DIR), dtype="fp32"))
    original = model.llm.model.state_dict()
    assert set(llm.model.state_dict()) == set(original)
    for name, tensor in llm.model.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    import yaml

    assert yaml.safe_load((tmp_path / "back" / "qformer_config.yaml").read_text()) == vars(model.cfg)


def test_command_line_round_trip_from_a_stage2_checkpoint(tmp_path, tiny_llm_dirs, capsys):  # noqa: F811
    """``to-hf`` of a checkpoint folder (model.safetensors + config.yaml, stage 2); ln_vision keeps the
    original 1e-5 epsilon, which HF cannot hold apart from the tower's 1e-6: reported."""
    import yaml

    from blip2_ds.config import Config, to_dict

    tower, model = build(tmp_path, tiny_llm_dirs)
    write_safetensors(tower.encoder.state_dict(), tmp_path / "eva.safetensors")
    cfg = Config(model=model.cfg, vision=tower_config(tmp_path, checkpoint=str(tmp_path / "eva.safetensors")),
                 language=language_config(tiny_llm_dirs), stage=2)
    ckpt = tmp_path / "step_00000010"
    write_safetensors(model.state_dict(), ckpt / "model.safetensors", {"format": "ours"})
    cfg.data.image_size = cfg.vision.image_size  # as a trainer's checkpoint has it
    (ckpt / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    assert convert_main(["to-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "epsilon 1e-05 becomes 1e-06" in out
    assert convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert "missing keys: 0" in capsys.readouterr().out
    back = read_state_dict(tmp_path / "back" / "model.safetensors")
    assert set(back) == set(model.state_dict())
    assert all(torch.equal(back[n], t) for n, t in model.state_dict().items())
    from transformers import AutoTokenizer

    assert IMAGE_TOKEN in AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True).get_vocab()


def test_t5_export_loads_and_generates_the_same(tmp_path, tiny_llm_dirs):  # noqa: F811
    """FlanT5 layout: [placeholders; prompt </s>] in the encoder; HF returns the decoder start token first."""
    from transformers import Blip2ForConditionalGeneration

    tower = build_vision_tower(tower_config(tmp_path))
    perturb(tower, 1)
    torch.manual_seed(0)
    llm = build_language_model(LanguageConfig(kind="t5", path=str(tiny_llm_dirs["t5"]), dtype="fp32", prompt=PROMPT))
    model = Stage2Model(tiny_qformer_config(vision_width=WIDTH, vision_norm_eps=1e-6), llm)
    perturb(model, 2)
    export_stage2(model.eval(), tower, tmp_path / "hf")
    hf, info = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True,
                                                            dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    x, q = pixels(), model.cfg.num_query_tokens
    gen = GenerationConfig(num_beams=1, max_new_tokens=6, min_new_tokens=0, repetition_penalty=1.0)
    ours = model.generate_ids(tower(x), prompt=PROMPT, gen=gen)
    prompt_ids = torch.tensor(llm.tokenizer([PROMPT] * 2).input_ids)  # prompt + </s>, as the project's encoder text
    ids = torch.cat([torch.full((2, q), hf.config.image_token_index), prompt_ids], 1)
    theirs = hf.eval().generate(pixel_values=x, input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=1,
                                do_sample=False, max_new_tokens=6, min_new_tokens=0, repetition_penalty=1.0)
    assert theirs[0, 0] == hf.config.text_config.decoder_start_token_id
    assert torch.equal(theirs[:, 1:], ours)


def test_towers_hf_cannot_express_are_refused(tmp_path, tiny_llm_dirs):  # noqa: F811
    tower, model = build(tmp_path, tiny_llm_dirs, kind="open_clip")
    with pytest.raises(ValueError, match="only timm Eva towers .*EVA01-g-14"):
        export_stage2(model, tower, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    eva = build_vision_tower(tower_config(tmp_path))
    eva.encoder.blocks[1].mlp.act = torch.nn.GELU(approximate="tanh")
    with pytest.raises(ValueError, match="not exact GELU"):
        check_exportable_tower(eva)
    eva = build_vision_tower(tower_config(tmp_path))
    eva.encoder.blocks[0].gamma_1 = torch.nn.Parameter(torch.ones(WIDTH))  # layer scale
    with pytest.raises(ValueError, match="gamma_1"):
        check_exportable_tower(eva)
