"""The frozen image encoder: an open_clip / timm ViT, cut after its second-to-last block.

BLIP-2 feeds the Q-Former ALL tokens (CLS + patches) of the ViT's second-to-last block and no
final norm: for EVA ViT-g/14 at 224 px that is (B, 257, 1408). ``build_vision_tower`` builds the
architecture open_clip describes (``EVA01-g-14``, ``ViT-L-14``, any open_clip ViT, or a custom
open_clip model-config JSON), keeps only the image tower, drops its last block, final norm, pooling
and projection, and loads local weights. Nothing is ever downloaded.

Two kinds of towers, as open_clip itself has them:

* ``timm``: configs with a ``timm_model_name`` (EVA01-g-14 -> ``eva_giant_patch14_224``). The timm
  model is created directly, at ``image_size``; attention goes through
  ``F.scaled_dot_product_attention`` (timm's fused attention).
* ``open_clip``: open_clip's own ``VisionTransformer`` (ViT-L-14, ...). Its blocks are kept as they
  are: ``nn.MultiheadAttention`` with ``need_weights=False``, which PyTorch computes with
  ``scaled_dot_product_attention`` (its native fast path in eval / no-grad).

Position embeddings: the tower is built at ``image_size``; a checkpoint trained at another size gets
its position embedding resampled on load (bicubic over the patch grid, no antialiasing, class
position kept: what LAVIS's ``interpolate_pos_embed`` does for 364 px).

Frozen means: every parameter has ``requires_grad=False``; the module stays in eval mode whatever
``train()`` is called with; ``forward`` runs under ``torch.no_grad()`` (not inference mode, whose
tensors could not be saved for the backward of the trainable ``ln_vision``); weights are stored
in ``VisionConfig.dtype`` (bf16 by default).
"""
from __future__ import annotations

import difflib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from blip2_ds.config import ConfigError, VisionConfig
from blip2_ds.state_io import read_state_dict

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Where the tower's tensors sit inside the checkpoints users bring: open_clip (full CLIP, timm
# trunk or own ViT), LAVIS (``visual_encoder.``), bare timm / BLIP-2 ``eva_vit_g.pth`` files, and
# this module's own ``state_dict()`` (``encoder.``).
# ``eva_vit_g.pth`` already uses timm Eva's names (cls_token, pos_embed, patch_embed.proj,
# blocks.{i}.norm1/attn.qkv/attn.q_bias/attn.v_bias/attn.proj/norm2/mlp.fc1/mlp.fc2), so no
# renaming is needed; timm's non-persistent ``k_bias`` buffer is the zeros the original uses.
_PREFIXES = ("", "visual.trunk.", "visual.", "visual_encoder.", "trunk.", "encoder.")


@dataclass
class LoadReport:
    """What loading a checkpoint into the tower did (logged, and kept as ``tower.load_report``)."""

    path: str
    prefix: str
    """Prefix stripped from the checkpoint's names ('' for timm / eva_vit_g.pth files)."""
    ignored: list[str] = field(default_factory=list)
    """Checkpoint tensors the tower does not use: the dropped last block, final norm, head, text tower."""
    resized: list[str] = field(default_factory=list)
    """Position embeddings resampled to the tower's patch grid."""


class FrozenVisionTower(nn.Module):
    """A ViT that returns all tokens of its second-to-last block; frozen, eval-only, half precision."""

    def __init__(self, encoder: nn.Module, kind: str, name: str, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if kind not in ("timm", "open_clip"):
            raise ValueError(f"kind must be 'timm' or 'open_clip', got {kind!r}")
        self.encoder = encoder
        self.kind = kind
        self.name = name
        self.load_report: LoadReport | None = None
        self._compiled = None
        """``encode`` through torch.compile (see :meth:`compile_forward`), or None: eager."""
        self.requires_grad_(False)
        self.to(dtype)
        self.train(False)

    # ---- shape ------------------------------------------------------------------------------
    @property
    def width(self) -> int:
        """Feature width of every output token (the Q-Former's ``vision_width``)."""
        return self.encoder.embed_dim if self.kind == "timm" else self.encoder.transformer.width

    @property
    def grid_size(self) -> tuple[int, int]:
        grid = self.encoder.patch_embed.grid_size if self.kind == "timm" else self.encoder.grid_size
        return int(grid[0]), int(grid[1])

    @property
    def image_size(self) -> int:
        size = self.encoder.patch_embed.img_size if self.kind == "timm" else self.encoder.image_size
        return int(size[0])

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches (the class token) that carry their own position embedding."""
        if self.kind == "timm":
            return 0 if self.encoder.no_embed_class else self.encoder.num_prefix_tokens
        return 1

    @property
    def num_tokens(self) -> int:
        """Tokens per image in the output: class token(s) + patches (257 for ViT-g/14 at 224 px)."""
        extra = self.encoder.num_prefix_tokens if self.kind == "timm" else 1
        return extra + self.grid_size[0] * self.grid_size[1]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def pos_embed_key(self) -> str:
        return "pos_embed" if self.kind == "timm" else "positional_embedding"

    # ---- frozen behaviour -------------------------------------------------------------------
    def train(self, mode: bool = True) -> FrozenVisionTower:
        """Always eval: a parent's ``model.train()`` must not turn on dropout / drop-path here."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) -> tokens (B, num_tokens, width) in the tower's dtype, without autograd."""
        size = self.image_size
        if pixels.dim() != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[2:]) != (size, size):
            raise ValueError(f"{self.name}: expected pixels of shape (B, 3, {size}, {size}), "
                             f"got {tuple(pixels.shape)}; set vision.image_size to the input resolution.")
        return (self._compiled or self.encode)(pixels)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The eager forward, without the shape check or the no-grad guard (``forward`` has both)."""
        x = pixels.to(self.dtype)
        if self.kind == "timm":
            return self.encoder.forward_features(x)  # final norm pruned: the last kept block's output
        return self.encoder.transformer(self.encoder._embeds(x))

    def compile_forward(self, mode: str, where: str = "vision.compile") -> None:
        """Run ``forward`` through ``torch.compile(mode=mode)`` from now on (``off``: eager again).

        Call after moving the tower to its device. On a CPU inductor compiles C++: without a
        compiler this is a ConfigError now, not a failure inside the first step.
        """
        from blip2_ds.config import COMPILE_MODES, ConfigError, _check_choice

        _check_choice(mode, COMPILE_MODES, where)
        self._compiled = None
        if mode == "off":
            return
        if next(self.parameters()).device.type == "cpu":
            from torch._inductor import cpp_builder

            try:
                cpp_builder.get_cpp_compiler()
            except Exception as err:  # inductor raises its own types, which vary across versions
                raise ConfigError(f"{where}={mode}: torch.compile on a CPU needs a C++ compiler ({err}); install "
                                  f"g++ or set {where}=off.") from None
        self._compiled = compiled_encoder(self, mode)

    # ---- weights ----------------------------------------------------------------------------
    def load_checkpoint(self, path: str | Path, where: str = "vision.checkpoint") -> LoadReport:
        """Copy the tower's tensors from a local checkpoint; missing or mis-shaped tensors are an error."""
        state = _read_checkpoint(Path(path), where)
        expected = self.encoder.state_dict()
        prefix = max(_PREFIXES, key=lambda p: sum(k.startswith(p) and k[len(p):] in expected for k in state))
        ours = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in expected}
        report = LoadReport(str(path), prefix, ignored=sorted(set(state) - {prefix + k for k in ours}))
        missing = sorted(set(expected) - set(ours))
        if missing:
            raise ConfigError(
                f"{where}: {path} lacks {len(missing)} of the {len(expected)} tensors of the {self.name} tower "
                f"(e.g. {', '.join(prefix + k for k in missing[:4])}); its {len(state)} tensors look like "
                f"{', '.join(sorted(state)[:4])}. Expected an open_clip (visual.*), LAVIS (visual_encoder.*), "
                f"timm or BLIP-2 eva_vit_g.pth checkpoint of this architecture.")
        key = self.pos_embed_key
        if ours[key].shape != expected[key].shape:
            ours[key] = self._resample_pos_embed(ours[key])
            report.resized.append(prefix + key)
        for name, tensor in ours.items():
            if tensor.shape != expected[name].shape:
                raise ConfigError(
                    f"{where}: {path}: tensor {prefix + name} has shape {tuple(tensor.shape)} but the "
                    f"{self.name} tower expects {tuple(expected[name].shape)}; the checkpoint is of "
                    f"another architecture (check vision.model_name / vision.model_config).")
        self.encoder.load_state_dict(ours, strict=True)
        self.load_report = report
        logger.info("vision tower %s: loaded %d tensors from %s%s; ignored %d not in the tower (e.g. %s)%s",
                    self.name, len(ours), path, f" (prefix {prefix!r})" if prefix else "", len(report.ignored),
                    ", ".join(report.ignored[:3]) or "-",
                    f"; resampled {', '.join(report.resized)} to grid {self.grid_size}" if report.resized else "")
        return report

    def _resample_pos_embed(self, pos: torch.Tensor) -> torch.Tensor:
        """Bicubic resampling of the patch part to this tower's grid; a mis-shaped input is returned as is."""
        from timm.layers import resample_abs_pos_embed

        batched = pos if pos.dim() == 3 else pos[None]  # open_clip stores (N, D), timm (1, N, D)
        prefix = self.num_prefix_tokens
        side = math.isqrt(max(batched.shape[1] - prefix, 0))
        if side * side != batched.shape[1] - prefix or batched.shape[-1] != self.width:
            return pos  # reported by the shape check with both shapes
        out = resample_abs_pos_embed(batched.float(), new_size=list(self.grid_size), old_size=[side, side],
                                     num_prefix_tokens=prefix, interpolation="bicubic", antialias=False)
        return out if pos.dim() == 3 else out[0]


def compiled_encoder(tower: FrozenVisionTower, mode: str):
    """``tower.encode`` through ``torch.compile`` (static shapes). With CUDA graphs the output lives in
    the graph's own buffer, which the next call overwrites, so it is copied out (one (B, 257, 1408)
    copy; callers may keep features across calls, e.g. retrieval over many batches)."""
    compiled = torch.compile(tower.encode, mode=None if mode == "default" else mode, dynamic=False)
    if mode != "reduce-overhead":
        return compiled

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return compiled(pixels).clone()

    return encode


def check_matches_qformer(tower: FrozenVisionTower, qformer_vision_width: int,
                          where: str = "model.vision_width") -> None:
    """Raise when the Q-Former's cross-attention expects another feature width than the tower gives."""
    if tower.width != qformer_vision_width:
        raise ConfigError(
            f"{where}={qformer_vision_width} but the vision tower {tower.name} outputs features of width "
            f"{tower.width}; set {where}={tower.width} (EVA01-g-14: 1408, ViT-L-14-quickgelu: 1024).")


def build_vision_tower(cfg: VisionConfig) -> FrozenVisionTower:
    """The frozen tower of ``cfg``: architecture from open_clip's config, weights from ``cfg.checkpoint``.

    Cheap checks (config, checkpoint path) run before the model is built. Without a checkpoint the
    weights are random (tests, dry runs). The model is built in fp32, pruned, then cast to
    ``cfg.dtype``; for ViT-g that briefly needs about 4 GB of host memory.
    """
    cfg.validate()
    if cfg.checkpoint is not None and not Path(cfg.checkpoint).exists():
        raise ConfigError(f"vision.checkpoint: {cfg.checkpoint} does not exist (a local open_clip / timm "
                          f"checkpoint or BLIP-2's eva_vit_g.pth; set it to null for random weights).")
    model_cfg, source = _model_config(cfg)
    encoder, kind = _build_encoder(model_cfg, source, cfg)
    tower = FrozenVisionTower(encoder, kind, source, TORCH_DTYPES[cfg.dtype])
    if cfg.checkpoint is not None:
        tower.load_checkpoint(cfg.checkpoint)
    return tower


def _model_config(cfg: VisionConfig) -> tuple[dict, str]:
    """The open_clip model config (from ``model_config`` JSON or by name) and a name for messages."""
    import open_clip

    if cfg.model_config is not None:
        path = Path(cfg.model_config)
        if not path.is_file():
            raise ConfigError(f"vision.model_config: {path} does not exist (an open_clip model-config JSON "
                              f'with "embed_dim", "vision_cfg" and "text_cfg").')
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"vision.model_config: {path} is not valid JSON: {err}") from None
        source = str(path)
    else:
        name = cfg.model_name
        if name.startswith("hf-hub:"):
            raise ConfigError(f"vision.model_name={name!r}: nothing is downloaded; save the model's "
                              f"open_clip_config.json locally and set vision.model_config to it.")
        try:
            data = open_clip.get_model_config(name)
        except OSError as err:
            raise ConfigError(f"vision.model_name={name!r}: {err}") from None
        if data is None:
            known = open_clip.list_models()
            close = difflib.get_close_matches(name, known, n=3)
            raise ConfigError(
                f"vision.model_name={name!r} is not an open_clip model"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + f". Valid names include EVA01-g-14 (BLIP-2's ViT-g), ViT-L-14-quickgelu (BLIP-2's ViT-L), ViT-B-16, ViT-H-14 ({len(known)} in "
                f"open_clip.list_models()); or set vision.model_config to an open_clip model-config JSON.")
        source = name
    if not isinstance(data, dict) or not isinstance(data.get("vision_cfg"), dict):
        raise ConfigError(f"vision.model_config: {source} has no \"vision_cfg\" mapping (expected open_clip's "
                          f'model-config format: {{"embed_dim": ..., "vision_cfg": {{...}}, "text_cfg": {{...}}}}).')
    return data, source


def _build_encoder(model_cfg: dict, source: str, cfg: VisionConfig) -> tuple[nn.Module, str]:
    """Build the image tower alone (no text tower) at ``cfg.image_size`` and prune it after block N-2."""
    vision_cfg = dict(model_cfg["vision_cfg"], image_size=cfg.image_size, patch_dropout=0.0)
    timm_name = vision_cfg.get("timm_model_name")
    if timm_name:
        import timm

        if not timm.is_model(timm_name):
            raise ConfigError(f"{source}: vision_cfg.timm_model_name={timm_name!r} is not a timm model.")
        try:  # open_clip's TimmModel ignores image_size; timm ViTs take img_size directly
            encoder = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=cfg.image_size)
        except TypeError as err:
            raise ConfigError(f"{source}: timm model {timm_name!r} is not a ViT with an img_size ({err}).") from None
        kind, blocks = "timm", getattr(encoder, "blocks", None)
        if blocks is None or getattr(encoder, "pos_embed", None) is None:
            raise ConfigError(f"{source}: timm model {timm_name!r} has no transformer blocks with an absolute "
                              f"position embedding; only ViT-style towers are supported.")
    else:
        from open_clip.model import _build_vision_tower  # builds the image tower only

        if isinstance(vision_cfg.get("layers"), (list, tuple)):
            raise ConfigError(f"{source}: vision_cfg.layers={vision_cfg['layers']} is a ResNet; BLIP-2 needs a ViT.")
        try:  # plain LayerNorms: every weight is stored in cfg.dtype (open_clip's "pure" bf16/fp16)
            encoder = _build_vision_tower(model_cfg.get("embed_dim", 512), vision_cfg,
                                          quick_gelu=model_cfg.get("quick_gelu", False))
        except TypeError as err:
            raise ConfigError(f"{source}: invalid vision_cfg: {err}") from None
        encoder.attn_pool = encoder.attn_pool_contrastive = None  # CoCa-style pooling, unused
        kind, blocks = "open_clip", encoder.transformer.resblocks
    if len(blocks) < 2:
        raise ConfigError(f"{source}: the vision tower has {len(blocks)} block(s); BLIP-2 drops the last one, so it needs >= 2.")
    # Keep blocks 0..N-2, replace the final norm and the head / projection by nothing.
    encoder.prune_intermediate_layers([len(blocks) - 2], prune_norm=True, prune_head=True)
    return encoder, kind


def _read_checkpoint(path: Path, where: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from {"state_dict"/"model"/"module": ...} and ``module.``."""
    try:
        if path.suffix == ".safetensors" or path.is_dir():
            state = read_state_dict(path)
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, not a tensor file, or pickled Python objects
        raise ConfigError(f"{where}: cannot read {path}: {err}") from None
    while isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in ("state_dict", "model", "module") if isinstance(state.get(k), dict)), None)
        if inner is None:
            raise ConfigError(f"{where}: {path} is not a state dict (top-level keys: {', '.join(map(str, list(state)[:6]))}).")
        state = inner
    if not isinstance(state, dict):
        raise ConfigError(f"{where}: {path} holds a {type(state).__name__}, not a state dict.")
    return {k.removeprefix("module."): v for k, v in state.items()}
