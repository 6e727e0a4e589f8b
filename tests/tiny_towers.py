"""Tiny timm EVA towers (EVA01's layout: fused qkv with q/v bias) registered under a name open_clip configs can use."""
import timm.models.eva
from timm.models import register_model


def register_tiny_eva(name: str, width: int, depth: int = 3, patch: int = 8, size: int = 32) -> str:
    """Register ``name`` with timm (once per process) as an EVA01 at test size; returns the name."""
    if name in timm.list_models(name):
        return name

    def build(pretrained=False, **kwargs):
        kwargs.setdefault("img_size", size)
        tiny = dict(patch_size=patch, embed_dim=width, depth=depth, num_heads=2, mlp_ratio=2.0)
        return timm.models.eva.eva_giant_patch14_224(pretrained=False, **dict(tiny, **kwargs))

    build.__name__ = build.__qualname__ = name
    register_model(build)
    return name


# The towers of the HF export tests: an EVA that HF's Blip2VisionModel can express, and an
# open_clip ViT (with ln_pre) that it cannot.
WIDTH, DEPTH, PATCH, SIZE = 24, 3, 8, 32
EXPORT_EVA = "blip2ds_tiny_eva_hf"
EXPORT_TOWERS = {
    "eva": dict(image_size=SIZE, timm_model_name=EXPORT_EVA, timm_model_pretrained=False,
                timm_pool="token", timm_proj=None),
    "open_clip": dict(image_size=SIZE, layers=DEPTH, width=WIDTH, head_width=12, patch_size=PATCH),
}


def export_tower_config(tmp_path, kind: str = "eva", **fields):
    """A VisionConfig of a tiny tower (``kind``: eva / open_clip) through an open_clip model-config JSON."""
    import json

    from blip2_ds.config import VisionConfig

    register_tiny_eva(EXPORT_EVA, WIDTH, DEPTH, PATCH, SIZE)
    path = tmp_path / f"tiny-{kind}.json"
    path.write_text(json.dumps({"embed_dim": 16, "vision_cfg": EXPORT_TOWERS[kind],
                                "text_cfg": dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1)}))
    return VisionConfig(model_config=str(path), image_size=SIZE, dtype="fp32", **fields)


def perturb(module, seed: int) -> None:
    """Every tensor distinct and away from its init (zero q/v biases, unit norms would hide mix-ups)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
