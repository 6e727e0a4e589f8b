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
