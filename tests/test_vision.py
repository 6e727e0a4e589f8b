"""The frozen vision tower: parity with open_clip, checkpoint layouts, frozen-ness, errors.

Tiny towers only (width 32, 3 blocks, patch 8, 32 px). The EVA path uses a tiny timm model
registered here (``eva_giant_patch14_224`` with small kwargs), so that open_clip itself can build
the reference CLIP around it exactly as it builds EVA01-g-14.
"""
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from blip2_ds.config import ConfigError, VisionConfig
from blip2_ds.models import vision
from blip2_ds.models.stage1 import Stage1Model
from blip2_ds.models.vision import FrozenVisionTower, build_vision_tower, check_matches_qformer
from tests.conftest import random_text, tiny_qformer_config
from tests.tiny_towers import register_tiny_eva

WIDTH, DEPTH, PATCH, SIZE = 32, 3, 8, 32
TOKENS = 1 + (SIZE // PATCH) ** 2


TINY_EVA = register_tiny_eva("blip2ds_tiny_eva", WIDTH, DEPTH, PATCH, SIZE)


VISION_CFGS = {
    "open_clip": dict(image_size=SIZE, layers=DEPTH, width=WIDTH, head_width=16, patch_size=PATCH),
    "eva": dict(image_size=SIZE, timm_model_name=TINY_EVA, timm_model_pretrained=False,
                timm_pool="token", timm_proj=None),
}
TEXT_CFG = dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1)


def write_model_config(tmp_path, kind: str) -> str:
    path = tmp_path / f"tiny-{kind}.json"
    path.write_text(json.dumps({"embed_dim": 16, "vision_cfg": VISION_CFGS[kind], "text_cfg": TEXT_CFG}))
    return str(path)


def reference_clip(kind: str, seed: int = 0) -> open_clip.CLIP:
    """The full open_clip model (image + text towers) with random weights, fp32, eval."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(16, VISION_CFGS[kind], TEXT_CFG).eval()
    with torch.no_grad():  # open_clip leaves some tensors at constant init; make every one distinct
        for p in model.visual.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def reference_tokens(model: open_clip.CLIP, kind: str, pixels: torch.Tensor) -> torch.Tensor:
    """Hidden states after block N-2 of the full model, taken with a forward hook."""
    blocks = model.visual.trunk.blocks if kind == "eva" else model.visual.transformer.resblocks
    seen = []
    handle = blocks[-2].register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        model.encode_image(pixels)
    handle.remove()
    return seen[0]


def pixels(batch: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def tower_cfg(tmp_path, kind: str, **fields) -> VisionConfig:
    fields.setdefault("image_size", SIZE)
    return VisionConfig(model_config=write_model_config(tmp_path, kind), **fields)


# ---- parity and checkpoint layouts -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["open_clip", "eva"])
def test_matches_open_clip_block_n_minus_2_from_wrapped_open_clip_checkpoint(tmp_path, kind):
    model = reference_clip(kind)
    # An open_clip training checkpoint: {"state_dict": ...} with DDP's "module." prefixes.
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    tower = build_vision_tower(tower_cfg(tmp_path, kind, checkpoint=str(path), dtype="fp32"))
    x = pixels()
    out = tower(x)
    assert out.shape == (2, TOKENS, WIDTH) == (2, tower.num_tokens, tower.width)
    torch.testing.assert_close(out, reference_tokens(model, kind, x), rtol=1e-5, atol=1e-5)
    # The last block, final norm, head/projection and the whole text tower are reported, not loaded.
    ignored = set(tower.load_report.ignored)
    trunk = "visual.trunk." if kind == "eva" else "visual."
    last = f"{trunk}blocks.{DEPTH - 1}." if kind == "eva" else f"visual.transformer.resblocks.{DEPTH - 1}."
    assert tower.load_report.prefix == trunk
    assert any(k.startswith(last) for k in ignored)
    assert {"token_embedding.weight", "text_projection"} <= ignored
    assert (f"{trunk}norm.weight" if kind == "eva" else "visual.ln_post.weight") in ignored


def eva_vit_g_names(depth: int) -> set[str]:
    """Tensor names of BLIP-2's eva_vit_g.pth (as listed from the original file's layout)."""
    names = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(depth):
        names |= {f"blocks.{i}.{n}" for n in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.proj.weight",
            "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
            "mlp.fc2.bias")}
    return names


@pytest.mark.parametrize("layout", ["eva_vit_g.pth", "lavis", "timm.safetensors"])
def test_eva_checkpoint_layouts_load(tmp_path, layout):
    model = reference_clip("eva")
    trunk = {k.removeprefix("visual.trunk."): v for k, v in model.state_dict().items()
             if k.startswith("visual.trunk.") and not k.startswith("visual.trunk.head.")}
    assert set(trunk) == eva_vit_g_names(DEPTH)  # timm's Eva names ARE the eva_vit_g.pth names
    if layout == "eva_vit_g.pth":
        path = tmp_path / "eva_vit_g.pth"
        torch.save(trunk, path)
    elif layout == "lavis":  # a LAVIS BLIP-2 checkpoint holds the ViT as visual_encoder.*
        path = tmp_path / "blip2_pretrained.pth"
        torch.save({"model": {"visual_encoder." + k: v for k, v in trunk.items()} | {"query_tokens": torch.zeros(1)}},
                   path)
    else:
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in trunk.items()}, str(path))
    tower = build_vision_tower(tower_cfg(tmp_path, "eva", checkpoint=str(path), dtype="fp32"))
    x = pixels()
    torch.testing.assert_close(tower(x), reference_tokens(model, "eva", x), rtol=1e-5, atol=1e-5)
    prefix = "visual_encoder." if layout == "lavis" else ""
    dropped = {prefix + k for k in trunk if k.startswith(f"blocks.{DEPTH - 1}.") or k.startswith("norm.")}
    assert dropped <= set(tower.load_report.ignored)
    assert not {prefix + k for k in trunk if k.startswith("blocks.0.")} & set(tower.load_report.ignored)


# ---- frozen ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["open_clip", "eva"])
def test_frozen_bf16_and_stage1_trains_on_its_output(tmp_path, kind):
    tower = build_vision_tower(tower_cfg(tmp_path, kind))  # bf16 by default
    params = list(tower.parameters())
    assert params and all(p.dtype == torch.bfloat16 and p.element_size() == 2 for p in params)
    assert all(not p.requires_grad for p in params)
    stage1 = Stage1Model(tiny_qformer_config(vision_width=tower.width))
    check_matches_qformer(tower, stage1.cfg.vision_width)
    parent = nn.ModuleDict({"tower": tower, "stage1": stage1})
    parent.train()
    tower.train(True)
    assert stage1.training and not any(m.training for m in tower.modules())
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    stage1_before = stage1.ln_vision.weight.detach().clone()
    optimizer = torch.optim.AdamW(stage1.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        feats = tower(pixels(4))
        assert feats.dtype == torch.bfloat16 and not feats.requires_grad
        ids, mask = random_text(4, 6, stage1.cfg.vocab_size, gen)
        out = stage1(feats, ids, mask, sample_seed=step)
        optimizer.zero_grad()
        out.loss.backward()
        assert stage1.ln_vision.weight.grad is not None
        optimizer.step()
    assert all(p.grad is None for p in tower.parameters())
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())
    assert not torch.equal(stage1_before, stage1.ln_vision.weight.detach())


def test_fp16_storage_and_own_state_dict_round_trip(tmp_path):
    tower = build_vision_tower(tower_cfg(tmp_path, "open_clip", dtype="fp16"))
    assert {p.dtype for p in tower.parameters()} == {torch.float16}
    path = tmp_path / "tower.pt"
    torch.save(tower.state_dict(), path)  # names "encoder.*"
    again = build_vision_tower(tower_cfg(tmp_path, "open_clip", dtype="fp16", checkpoint=str(path)))
    assert again.load_report.prefix == "encoder." and again.load_report.ignored == []
    assert torch.equal(tower(pixels()), again(pixels()))


# ---- other resolutions -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["open_clip", "eva"])
def test_other_image_size_interpolates_position_embedding(tmp_path, kind):
    model = reference_clip(kind)
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    tower = build_vision_tower(tower_cfg(tmp_path, kind, image_size=48, checkpoint=str(path), dtype="fp32"))
    assert tower.num_tokens == 1 + 6 * 6
    assert tower(pixels(2, 48)).shape == (2, 37, WIDTH)
    key = "visual.trunk.pos_embed" if kind == "eva" else "visual.positional_embedding"
    assert tower.load_report.resized == [key]
    source = model.state_dict()[key].reshape(TOKENS, WIDTH)
    loaded = tower.encoder.state_dict()[tower.pos_embed_key].reshape(37, WIDTH)
    grid = source[1:].reshape(1, 4, 4, WIDTH).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    assert torch.equal(loaded[0], source[0])  # class position kept
    torch.testing.assert_close(loaded[1:], expected.reshape(36, WIDTH))
    with pytest.raises(ValueError, match=r"\(B, 3, 48, 48\)"):
        tower(pixels(1, SIZE))


# ---- errors ------------------------------------------------------------------------------------
def test_unknown_model_name_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"vision.model_name='EVA01-g-41'.*EVA01-g-14.*ViT-L-14"):
        build_vision_tower(VisionConfig(model_name="EVA01-g-41"))
    with pytest.raises(ConfigError, match=r"vision.model_name='hf-hub:org/x': nothing is downloaded"):
        build_vision_tower(VisionConfig(model_name="hf-hub:org/x"))


def test_missing_files_fail_before_building(tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before the cheap checks")

    monkeypatch.setattr(vision, "_build_encoder", no_build)
    missing = tmp_path / "eva_vit_g.pth"
    with pytest.raises(ConfigError, match=rf"vision.checkpoint: {missing} does not exist"):
        build_vision_tower(VisionConfig(model_name="EVA01-g-14", checkpoint=str(missing)))
    with pytest.raises(ConfigError, match=rf"vision.model_config: {tmp_path / 'nope.json'} does not exist"):
        build_vision_tower(VisionConfig(model_config=str(tmp_path / "nope.json")))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"embed_dim": 16}))
    with pytest.raises(ConfigError, match="bad.json has no \"vision_cfg\""):
        build_vision_tower(VisionConfig(model_config=str(bad)))


def test_mismatched_and_missing_tensors_are_named(tmp_path):
    state = reference_clip("open_clip").state_dict()
    state["visual.conv1.weight"] = torch.zeros(WIDTH, 3, 14, 14)
    path = tmp_path / "wrong.pt"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=rf"vision.checkpoint: {path}: tensor visual.conv1.weight has shape "
                                          rf"\(32, 3, 14, 14\) but .* expects \(32, 3, 8, 8\)"):
        build_vision_tower(tower_cfg(tmp_path, "open_clip", checkpoint=str(path)))
    del state["visual.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"lacks 1 of the .* tensors .*visual.conv1.weight"):
        build_vision_tower(tower_cfg(tmp_path, "open_clip", checkpoint=str(path)))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=rf"vision.checkpoint: cannot read {path}"):
        build_vision_tower(tower_cfg(tmp_path, "open_clip", checkpoint=str(path)))


def test_width_must_match_the_qformer(tmp_path):
    tower = build_vision_tower(tower_cfg(tmp_path, "eva"))
    assert isinstance(tower, FrozenVisionTower) and tower.width == WIDTH
    check_matches_qformer(tower, WIDTH)
    with pytest.raises(ConfigError, match=r"model.vision_width=1408 .* width 32; set model.vision_width=32"):
        check_matches_qformer(tower, 1408)


# ---- torch.compile of the frozen forward -------------------------------------------------------
@pytest.mark.parametrize("kind,mode", [("open_clip", "default"), ("eva", "reduce-overhead")])
def test_compiled_forward_matches_eager(tmp_path, kind, mode):
    """Same tokens as the eager tower (fp32, inductor on CPU); with CUDA graphs the outputs of two
    calls stay distinct tensors (copied out of the graph's buffer); ``off`` is eager again."""
    model = reference_clip(kind)
    path = tmp_path / "tower.pt"
    torch.save(model.state_dict(), path)
    tower = build_vision_tower(tower_cfg(tmp_path, kind, checkpoint=str(path), dtype="fp32"))
    first, second = pixels(), pixels(batch=2) * 0.5
    eager_first, eager_second = tower(first), tower(second)
    tower.compile_forward(mode)
    out_first = tower(first)
    out_second = tower(second)
    torch.testing.assert_close(out_first, eager_first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_second, eager_second, rtol=1e-5, atol=1e-5)
    assert out_first.data_ptr() != out_second.data_ptr()
    assert not out_first.requires_grad
    with pytest.raises(ValueError, match=r"expected pixels of shape"):
        tower(pixels(size=SIZE * 2))  # the shape check still runs before the compiled code
    tower.compile_forward("off")
    assert tower._compiled is None


def test_compile_mode_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"vision\.compile='fast' is not one of off, default"):
        tower_cfg(tmp_path, "open_clip", compile="fast").validate()
    tower = build_vision_tower(tower_cfg(tmp_path, "open_clip", dtype="fp32"))
    with pytest.raises(ConfigError, match=r"vision\.compile='max' is not one of"):
        tower.compile_forward("max")
