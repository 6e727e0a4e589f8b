"""Stage 2 <-> Hugging Face ``Blip2ForConditionalGeneration`` (vision tower + Q-Former + LLM in one folder).

A stage-2 checkpoint of this project holds the trainable part only (queries, ``ln_vision``,
Q-Former without text parts, ``llm_proj``); the frozen towers live in their own files. HF's
``Blip2ForConditionalGeneration`` wants all three in one folder, so the export gathers:

- the frozen vision tower, renamed from timm's ``Eva`` layout (EVA01-g-14 =
  ``eva_giant_patch14_224``) to ``vision_model.*``. Only the blocks the tower runs are written
  (BLIP-2 drops the last one), so ``num_hidden_layers`` is the kept block count and HF's
  ``post_layernorm`` is the project's ``ln_vision`` (as HF's own BLIP-2 conversion does);
- the trainable part through :mod:`blip2_ds.convert`'s name table (``llm_proj`` ->
  ``language_projection``);
- the frozen LLM under ``language_model.*``, its tokenizer (plus HF's ``<image>`` placeholder
  token), an image processor with the project's size and CLIP mean/std, and a generation config
  with the project's end tokens and decoding settings.

Things HF cannot express exactly are either refused (towers other than timm Eva) or reported:
HF's ``post_layernorm`` shares the vision layers' epsilon, so an ``ln_vision`` epsilon that
differs from the tower's is a warning. What HF has no field for (the project's Q-Former config,
the LLM's original row count, the text prompt) travels in the metadata of the extras sidecar of
:mod:`blip2_ds.convert`, and ``from-hf`` reads it back.

Stage 1 <-> ``Blip2ForImageTextRetrieval`` (:func:`export_stage1` / :func:`import_stage1`): the same
vision tower mapping, the Q-Former with its text parts and the ITC projections / ITM head through
convert.py's table, a config with HF's text input on and ``image_text_hidden_size = embed_dim``, the
Q-Former's BERT tokenizer (with ``[DEC]``) and a Blip2Processor without ``num_query_tokens`` (the
retrieval model takes plain text ids). The LM head and the temperature, which HF has no place for,
stay in the extras sidecar.

Command line: ``python -m blip2_ds.convert to-hf CHECKPOINT HF_DIR`` and
``python -m blip2_ds.convert from-hf HF_DIR OUT_DIR`` (dispatched here for stage-1 / stage-2 training
checkpoints and for ``Blip2ForConditionalGeneration`` / ``Blip2ForImageTextRetrieval`` folders).
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from blip2_ds.config import GenerationConfig, QFormerConfig
from blip2_ds.convert import (CONFIG_FILE, EXTRAS_FILE, HF, MODEL_FILE, OURS, ConversionReport, compile_template,
                              convert)
from blip2_ds.state_io import read_state_dict, write_safetensors
from blip2_ds.trained import build_trained, load_checkpoint_config, resolve_weights

HF_ARCH = "Blip2ForConditionalGeneration"
HF_ITM_ARCH = "Blip2ForImageTextRetrieval"
VISION, LLM, PROJ = "vision_model.", "language_model.", ("llm_proj.", "language_projection.")
TOWER_FILE = "vision_tower.safetensors"
"""from-hf: the vision tower in timm Eva naming (usable as ``vision.checkpoint``)."""
LLM_DIR = "llm"
"""from-hf: the LLM as an HF folder (usable as ``language.path``)."""
_META_KEY = "blip2_ds_stage2"
_META_KEY_STAGE1 = "blip2_ds_stage1"
IMAGE_TOKEN = "<image>"

# timm Eva name -> Blip2VisionModel name. The q/v biases have no rule: HF stores one fused qkv bias.
_TOWER_RULES = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("blocks.{i}.attn.qkv.weight", "encoder.layers.{i}.self_attn.qkv.weight"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.projection.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layers.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layers.{i}.mlp.fc2.{p}"),
]
_TOWER_COMPILED = [tuple((tpl, compile_template(tpl)) for tpl in rule) for rule in _TOWER_RULES]
_BIASES = ("blocks.{i}.attn.q_bias", "blocks.{i}.attn.v_bias")
_HF_QKV_BIAS = "encoder.layers.{i}.self_attn.qkv.bias"
EXPORTABLE = ("timm Eva towers with a class token, absolute position embeddings, fused qkv with q/v biases, "
              "a plain GELU MLP, no layer scale, no rotary embedding and no pre-norm "
              "(EVA01-g-14, i.e. timm eva_giant_patch14_*)")


# ---- vision tower ----------------------------------------------------------------------------------
def _tower_rename(name: str, source: int, target: int) -> str:
    """``name`` mapped by the tower table (0 = timm, 1 = HF); KeyError for names outside it."""
    for rule in _TOWER_COMPILED:
        match = rule[source][1].match(name)
        if match:
            return rule[target][0].format(**match.groupdict())
    raise KeyError(name)


def _expected_tower_keys(depth: int) -> set[str]:
    per_block = [t for t, _ in _TOWER_RULES if "{i}" in t] + list(_BIASES)
    keys = {t for t, _ in _TOWER_RULES if "{i}" not in t}
    keys = {k.format(p=p) for k in keys for p in ("weight", "bias")}
    return keys | {k.format(i=i, p=p) for k in per_block for i in range(depth) for p in ("weight", "bias")}


def check_exportable_tower(tower) -> None:
    """Raise ValueError unless HF's Blip2VisionModel computes exactly what ``tower`` computes.

    HF's vision model is fixed: class token + absolute positions, then pre-norm blocks with a
    fused qkv (zero key bias), exact GELU, one LayerNorm epsilon everywhere, no pre-norm. Any
    other tower would be exported as a different network, so it is refused by name.
    """
    import timm.models.eva
    from torch import nn

    encoder = getattr(tower, "encoder", None)
    if getattr(tower, "kind", None) != "timm" or not isinstance(encoder, timm.models.eva.Eva):
        layout = type(encoder).__name__ if encoder is not None else type(tower).__name__
        raise ValueError(f"the vision tower {getattr(tower, 'name', '?')} ({layout}) has no exact Hugging Face "
                         f"Blip2VisionModel equivalent (an open_clip VisionTransformer has ln_pre, which HF lacks); "
                         f"only {EXPORTABLE} export.")
    problems = []
    keys = set(encoder.state_dict())
    expected = _expected_tower_keys(len(encoder.blocks))
    if keys != expected:
        problems.append(f"tensors outside the layout: {sorted(keys - expected)[:6]}, "
                        f"lacking: {sorted(expected - keys)[:6]}")
    if encoder.rope is not None or encoder.no_embed_class or encoder.num_prefix_tokens != 1:
        problems.append("rotary embedding / no class position / register tokens")
    if getattr(encoder, "dynamic_img_size", False):
        problems.append("dynamic image size")
    block_norms = [m for blk in encoder.blocks for m in (blk.norm1, blk.norm2)]
    norms = {getattr(m, "eps", None) for m in block_norms}
    if len(norms) != 1 or not all(isinstance(m, nn.LayerNorm) for m in block_norms):
        problems.append(f"block norms are not LayerNorms with one epsilon ({sorted(norms)})")
    acts = {type(blk.mlp.act).__name__ + getattr(blk.mlp.act, "approximate", "") for blk in encoder.blocks}
    if acts != {"GELUnone"}:
        problems.append(f"MLP activation {sorted(acts)} is not exact GELU")
    if problems:
        raise ValueError(f"the vision tower {tower.name} cannot be exported exactly to Hugging Face: "
                         f"{'; '.join(problems)}. Only {EXPORTABLE} export.")


def tower_eps(tower) -> float:
    return float(tower.encoder.blocks[0].norm1.eps)


def hf_vision_config(tower):
    """The Blip2VisionConfig of the blocks the tower runs (depth N-1 of the N-block model)."""
    from transformers import Blip2VisionConfig

    encoder = tower.encoder
    block = encoder.blocks[0]
    return Blip2VisionConfig(
        hidden_size=tower.width, intermediate_size=block.mlp.fc1.out_features, num_hidden_layers=len(encoder.blocks),
        num_attention_heads=block.attn.num_heads, image_size=tower.image_size,
        patch_size=int(encoder.patch_embed.patch_size[0]), hidden_act="gelu", layer_norm_eps=tower_eps(tower),
        attention_dropout=0.0, qkv_bias=True)


def tower_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm Eva tensors -> ``vision_model.*``; q/v biases fused as HF stores them: cat(q, 0, v)."""
    out = {}
    for name, tensor in state.items():
        if name.endswith(("attn.q_bias", "attn.v_bias")):
            continue
        out[VISION + _tower_rename(name, 0, 1)] = tensor
    for i in sorted({int(n.split(".")[1]) for n in state if n.startswith("blocks.")}):
        q, v = (state[t.format(i=i)] for t in _BIASES)
        out[VISION + _HF_QKV_BIAS.format(i=i)] = torch.cat([q, torch.zeros_like(q), v])
    return out


def tower_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``vision_model.*`` (post_layernorm excluded) -> timm Eva names; a non-zero key bias is an error
    (timm's key bias is a fixed zero buffer)."""
    out = {}
    for name, tensor in state.items():
        inner = name[len(VISION):]
        if inner.endswith("self_attn.qkv.bias"):
            i = int(inner.split(".")[2])
            q, k, v = tensor.chunk(3)
            if torch.count_nonzero(k):
                raise ValueError(f"{name}: the key part of the fused qkv bias is not zero; timm Eva cannot hold it.")
            out[_BIASES[0].format(i=i)], out[_BIASES[1].format(i=i)] = q.clone(), v.clone()
        else:
            out[_tower_rename(inner, 1, 0)] = tensor
    return out


# ---- Q-Former, queries, projection -------------------------------------------------------------
def hf_qformer_config(cfg: QFormerConfig, text_input: bool = False):
    """Blip2QFormerConfig of ``cfg``; ``text_input`` for the retrieval model (its text embeddings and passes)."""
    from transformers import Blip2QFormerConfig

    return Blip2QFormerConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size, hidden_act="gelu",
        hidden_dropout_prob=cfg.hidden_dropout, attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_position_embeddings, layer_norm_eps=cfg.layer_norm_eps,
        cross_attention_frequency=cfg.cross_attention_freq, encoder_hidden_size=cfg.vision_width,
        pad_token_id=cfg.pad_token_id, use_qformer_text_input=text_input)


def _swap_projection(state: dict[str, torch.Tensor], source: str, target: str) -> dict[str, torch.Tensor]:
    """Rename the LLM projection (the one stage-2 tensor convert.py's stage-1 table lacks)."""
    src, dst = PROJ if source == OURS else PROJ[::-1]
    return {dst + n[len(src):]: t for n, t in state.items() if n.startswith(src)}


def trainable_to_hf(state: dict[str, torch.Tensor], report: ConversionReport) -> dict[str, torch.Tensor]:
    """Stage2Model state dict -> HF names, through convert.py's table plus the projection."""
    rest = {n: t for n, t in state.items() if not n.startswith(PROJ[0])}
    result = convert(rest, OURS, HF)
    if result.extras or result.report.unexpected:
        raise ValueError(f"not a stage-2 state dict: {sorted(result.extras) + result.report.unexpected} "
                         f"have no place in {HF_ARCH}.")
    report.converted += result.report.converted
    return {**result.state_dict, **_swap_projection(state, OURS, HF)}


def trainable_from_hf(state: dict[str, torch.Tensor], report: ConversionReport) -> dict[str, torch.Tensor]:
    """HF tensors (vision tower and LLM excluded, post_layernorm included) -> Stage2Model names."""
    rest = {n: t for n, t in state.items() if not n.startswith(PROJ[1])}
    result = convert(rest, HF, OURS)
    report.converted += result.report.converted
    report.unexpected.extend(result.report.unexpected + result.report.frozen)
    return {**result.state_dict, **_swap_projection(state, HF, OURS)}


# ---- LLM ----------------------------------------------------------------------------------------
def _unaliased(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop entries that share storage with an earlier one (tied LM head): HF re-ties them on load."""
    seen, out = set(), {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out


def _vocab_tensor_names(model) -> list[str]:
    """Every state-dict name of the input embedding and (if not tied to it) the output embedding."""
    wanted = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not wanted[0]:
        wanted.append(head.weight)
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [name for p in wanted for name in names[id(p)]]


def llm_to_hf(llm, rows: int) -> tuple[dict[str, torch.Tensor], object]:
    """The frozen LLM's tensors under ``language_model.*`` and its config, with the vocabulary
    tensors grown to ``rows`` by zero rows (room for the ``<image>`` placeholder; the live model
    is not touched). A zero LM-head row gives the placeholder a logit of 0, so the generation
    config suppresses it."""
    model = llm.model
    state = _unaliased(model.state_dict())
    for name in _vocab_tensor_names(model):
        if name in state and state[name].shape[0] < rows:
            weight = state[name]
            state[name] = torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])
    text_config = copy.deepcopy(model.config)
    text_config.vocab_size = max(rows, text_config.vocab_size)
    return {LLM + n: t for n, t in state.items()}, text_config


def _tokenizer_with_image_token(llm):
    """A fresh copy of the LLM tokenizer (from ``language.path``) with HF's ``<image>`` token added.

    OPT gets left padding, what batched generation with a decoder-only model needs.
    """
    from transformers import AddedToken, AutoTokenizer

    side = "left" if llm.kind == "opt" else "right"
    tokenizer = AutoTokenizer.from_pretrained(str(llm.cfg.path), local_files_only=True, padding_side=side)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    return tokenizer


def _generation_config(llm, gen: GenerationConfig, suppress: list[int]):
    """The project's decoding settings and end tokens (OPT: "\\n" and </s>) as an HF GenerationConfig.

    Known difference: HF's Blip2 generate passes the prompt ids to the LLM, so a repetition
    penalty also counts the prompt (and placeholder) tokens; the project's generation sees
    generated tokens only. With ``repetition_penalty=1`` both are identical.
    """
    from transformers import GenerationConfig as HFGenerationConfig

    tok = llm.tokenizer
    return HFGenerationConfig(
        num_beams=gen.num_beams, max_new_tokens=gen.max_new_tokens, min_new_tokens=gen.min_new_tokens,
        repetition_penalty=gen.repetition_penalty, length_penalty=gen.length_penalty, do_sample=False,
        eos_token_id=list(llm.end_token_ids), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        decoder_start_token_id=getattr(llm.model.config, "decoder_start_token_id", None),
        suppress_tokens=suppress or None)


def _write_processor(out: Path, tokenizer, image_size: int, num_query_tokens: int) -> None:
    """Blip2Processor files: BlipImageProcessor (bicubic resize to the tower's size, CLIP mean/std, as
    blip2_ds/data/transforms.py normalises) + the tokenizer + ``num_query_tokens``."""
    from transformers import BlipImageProcessor, Blip2Processor

    from blip2_ds.data.transforms import CLIP_MEAN, CLIP_STD

    images = BlipImageProcessor(size={"height": image_size, "width": image_size}, resample=3,
                                image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)
    Blip2Processor(image_processor=images, tokenizer=tokenizer, num_query_tokens=num_query_tokens).save_pretrained(out)


# ---- export / import ------------------------------------------------------------------------------
def _check_keys(config, state: dict[str, torch.Tensor], arch: str = HF_ARCH) -> None:
    """Refuse to write a folder HF's ``arch`` would load with missing / unexpected / mis-shaped tensors."""
    import transformers

    with torch.device("meta"):
        hf = getattr(transformers, arch)(config)
    expected = {n: t.shape for n, t in hf.state_dict().items()}
    aliases: dict[int, set[str]] = {}
    for name, param in hf.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), set()).add(name)
    # A tied tensor (OPT's LM head, T5's encoder/decoder tables) is written once; HF re-ties it.
    tied = {n for group in aliases.values() if group & set(state) for n in group}
    problems = sorted(set(expected) - set(state) - tied) + sorted(set(state) - set(expected))
    problems += [f"{n}: {tuple(t.shape)} vs {tuple(expected[n])}" for n, t in state.items()
                 if n in expected and t.shape != expected[n]]
    if problems:
        raise ValueError(f"the export does not fit {arch}: {problems[:8]}")


def _check_tower(cfg: QFormerConfig, tower, report: ConversionReport) -> None:
    """Refuse towers HF cannot hold; warn when ``ln_vision``'s epsilon differs from the tower's."""
    check_exportable_tower(tower)
    if tower.width != cfg.vision_width:
        raise ValueError(f"tower width {tower.width} != model.vision_width {cfg.vision_width}.")
    if cfg.vision_norm_eps != tower_eps(tower):
        report.warnings.append(
            f"ln_vision epsilon {cfg.vision_norm_eps} becomes {tower_eps(tower)}: HF's post_layernorm shares "
            f"the vision layers' epsilon (HF's own BLIP-2 conversion does the same); features differ slightly.")


def export_stage2(model, tower, out: str | Path, gen: GenerationConfig | None = None) -> ConversionReport:
    """Write ``model`` (a Stage2Model with its LLM) and ``tower`` as one HF Blip2ForConditionalGeneration folder."""
    from transformers import Blip2Config

    out = Path(out)
    report = ConversionReport(OURS, HF)
    llm = model.llm
    if llm is None:
        raise ValueError("the Stage2Model has no LLM (llm=None): the export needs the frozen LLM.")
    _check_tower(model.cfg, tower, report)
    tokenizer = _tokenizer_with_image_token(llm)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = llm.model.get_input_embeddings().weight.shape[0]
    llm_state, text_config = llm_to_hf(llm, max(rows, image_id + 1))
    state = {**tower_to_hf(tower.encoder.state_dict()), **trainable_to_hf(model.state_dict(), report), **llm_state}
    report.frozen = sorted(n for n in state if n.startswith((VISION, LLM)) and not n.startswith(VISION + "post_"))
    config = Blip2Config(vision_config=hf_vision_config(tower).to_dict(),
                         qformer_config=hf_qformer_config(model.cfg).to_dict(), text_config=text_config.to_dict(),
                         num_query_tokens=model.cfg.num_query_tokens, image_token_index=image_id)
    config.architectures = [HF_ARCH]
    config.dtype = llm.dtype
    _check_keys(config, state)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(state, out / MODEL_FILE, {"format": "pt"})
    config.save_pretrained(out)
    _generation_config(llm, gen or GenerationConfig(), [image_id] if image_id >= rows else []).save_pretrained(out)
    _write_processor(out, tokenizer, tower.image_size, model.cfg.num_query_tokens)
    meta = {"qformer_config": asdict(model.cfg), "llm_rows": rows, "kind": llm.kind, "prompt": llm.cfg.prompt,
            "max_text_len": llm.cfg.max_text_len}
    write_safetensors({}, out / EXTRAS_FILE, {"format": OURS, _META_KEY: json.dumps(meta)})
    return report


def is_stage2_hf_folder(path: Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and HF_ARCH in (json.loads(config.read_text()).get("architectures") or [])


def _read_meta(path: Path, key: str = _META_KEY) -> dict:
    """The sidecar's metadata entry ``key``; ``path`` is the HF folder or the sidecar file itself."""
    from safetensors import safe_open

    sidecar = path if path.is_file() else path / EXTRAS_FILE
    if not sidecar.is_file():
        return {}
    with safe_open(str(sidecar), "pt") as handle:
        return json.loads((handle.metadata() or {}).get(key, "{}"))


def _qformer_config_from_hf(config, meta: dict) -> QFormerConfig:
    """The project's Q-Former config: the sidecar's copy when there is one, else read off HF's config."""
    if "qformer_config" in meta:
        return QFormerConfig(**meta["qformer_config"])
    q = config.qformer_config
    return QFormerConfig(
        vocab_size=q.vocab_size, hidden_size=q.hidden_size, num_layers=q.num_hidden_layers,
        num_heads=q.num_attention_heads, intermediate_size=q.intermediate_size,
        max_position_embeddings=q.max_position_embeddings, layer_norm_eps=q.layer_norm_eps,
        hidden_dropout=q.hidden_dropout_prob, attention_dropout=q.attention_probs_dropout_prob,
        cross_attention_freq=q.cross_attention_frequency, num_query_tokens=config.num_query_tokens,
        vision_width=q.encoder_hidden_size, vision_norm_eps=config.vision_config.layer_norm_eps)


def _write_llm_folder(src: Path, out: Path, config, state: dict[str, torch.Tensor], rows: int | None) -> None:
    """``language_model.*`` -> an HF LLM folder (config, weights cut back to the original rows, tokenizer)."""
    import shutil

    llm = {n[len(LLM):]: t for n, t in state.items() if n.startswith(LLM)}
    text_config = copy.deepcopy(config.text_config)
    if rows is not None:
        vocab = text_config.vocab_size
        tables = ("embed_tokens.weight", "shared.weight", "lm_head.weight")
        llm = {n: (t[:rows] if n.endswith(tables) and t.shape[0] == vocab else t) for n, t in llm.items()}
        text_config.vocab_size = rows
    out.mkdir(parents=True, exist_ok=True)
    text_config.save_pretrained(out)
    write_safetensors(llm, out / MODEL_FILE, {"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "spiece.model", "added_tokens.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


def import_stage2(src: str | Path, out: str | Path) -> ConversionReport:
    """An HF Blip2ForConditionalGeneration folder -> a stage-2 project folder.

    Writes ``model.safetensors`` (Stage2Model naming), ``qformer_config.yaml``, the vision tower in
    timm Eva naming (``vision_tower.safetensors``, post_layernorm excluded: it is ``ln_vision``) and the
    LLM as an HF folder (``llm/``; the tokenizer keeps the ``<image>`` token, the weights lose the
    rows the export added).
    """
    from transformers import Blip2Config

    src, out = Path(src), Path(out)
    config = Blip2Config.from_pretrained(src)
    meta = _read_meta(src)
    state = read_state_dict(src)
    report = ConversionReport(HF, OURS)
    tower = {n: t for n, t in state.items() if n.startswith(VISION) and not n.startswith(VISION + "post_layernorm")}
    rest = {n: t for n, t in state.items() if not n.startswith(LLM) and n not in tower}
    ours = trainable_from_hf(rest, report)
    cfg = _qformer_config_from_hf(config, meta)
    from blip2_ds.convert import check_against
    from blip2_ds.models.stage2 import Stage2Model

    with torch.device("meta"):
        check_against(report, ours, Stage2Model(cfg, llm_hidden=config.text_config.hidden_size))
    timm_tower = tower_from_hf(tower)
    report.frozen = sorted(tower) + sorted(n for n in state if n.startswith(LLM))
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(ours, out / MODEL_FILE, {"format": OURS})
    (out / CONFIG_FILE).write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    write_safetensors(timm_tower, out / TOWER_FILE, {"format": "timm"})
    _write_llm_folder(src, out / LLM_DIR, config, state, meta.get("llm_rows"))
    return report


# ---- stage 1: Blip2ForImageTextRetrieval ---------------------------------------------------------
def _stage1_tokenizer(tokenizer_dir: str | Path | None, cfg: QFormerConfig, max_text_len: int):
    """The Q-Former's tokenizer as training loads it (``[DEC]`` added, right truncation at ``max_text_len``)."""
    from blip2_ds.models.pretrained import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir, max_length=max_text_len)
    if len(tokenizer) != cfg.vocab_size:
        raise ValueError(f"the tokenizer {tokenizer_dir} has {len(tokenizer)} tokens with [DEC], the Q-Former "
                         f"vocab_size is {cfg.vocab_size}: not the tokenizer this model was trained with.")
    return tokenizer


def _write_stage1_processor(out: Path, tokenizer, image_size: int) -> None:
    """Blip2Processor without ``num_query_tokens`` (the retrieval model takes plain text ids) + the tokenizer.

    Blip2Processor adds HF's ``<image>`` token to any tokenizer it is given; the retrieval model never
    uses it (it would be an id past the Q-Former's vocabulary), so the tokenizer files are written again
    without it: AutoTokenizer of the folder gives exactly the tokenizer the model was trained with.
    """
    _write_processor(out, copy.deepcopy(tokenizer), image_size, None)
    tokenizer.save_pretrained(out)


def export_stage1(model, tower, out: str | Path, tokenizer_dir: str | Path | None = None,
                  max_text_len: int = 32) -> ConversionReport:
    """Write ``model`` (a Stage1Model) and ``tower`` as one HF Blip2ForImageTextRetrieval folder.

    ``tokenizer_dir``: the BERT tokenizer folder (``pretrained.tokenizer_path``); None writes the image
    processor only (with a warning). The LM head and the temperature go to the extras sidecar.
    """
    from transformers import BlipImageProcessor, Blip2Config

    from blip2_ds.data.transforms import CLIP_MEAN, CLIP_STD

    out = Path(out)
    cfg = model.cfg
    report = ConversionReport(OURS, HF)
    _check_tower(cfg, tower, report)
    tokenizer = _stage1_tokenizer(tokenizer_dir, cfg, max_text_len) if tokenizer_dir is not None else None
    result = convert(model.state_dict(), OURS, HF)
    if result.report.unexpected:
        raise ValueError(f"not a stage-1 state dict: {result.report.unexpected[:8]} have no place in {HF_ITM_ARCH}.")
    report.converted, report.extras = result.report.converted, list(result.report.extras)
    vision = tower_to_hf(tower.encoder.state_dict())
    state = {**vision, **result.state_dict}
    report.frozen = sorted(vision)
    config = Blip2Config(vision_config=hf_vision_config(tower).to_dict(),
                         qformer_config=hf_qformer_config(cfg, text_input=True).to_dict(),
                         num_query_tokens=cfg.num_query_tokens, image_text_hidden_size=cfg.embed_dim)
    config.architectures = [HF_ITM_ARCH]
    # The Q-Former and heads are fp32; a bf16 / fp16 tower widens to fp32 exactly on load.
    config.dtype = torch.float32
    _check_keys(config, state, HF_ITM_ARCH)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(state, out / MODEL_FILE, {"format": "pt"})
    config.save_pretrained(out)
    if tokenizer is not None:
        _write_stage1_processor(out, tokenizer, tower.image_size)
    else:
        BlipImageProcessor(size={"height": tower.image_size, "width": tower.image_size}, resample=3,
                           image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                           do_convert_rgb=True).save_pretrained(out)
        report.warnings.append("no tokenizer (pretrained.tokenizer_path / bert_path unset): the folder has an "
                               "image processor only; tokenize text with the BERT tokenizer plus [DEC].")
    meta = {"qformer_config": asdict(cfg), "max_text_len": max_text_len}
    write_safetensors(result.extras, out / EXTRAS_FILE, {"format": OURS, _META_KEY_STAGE1: json.dumps(meta)})
    return report


def is_stage1_hf_folder(path: Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and HF_ITM_ARCH in (json.loads(config.read_text()).get("architectures") or [])


def import_stage1(src: str | Path, out: str | Path, extras: str | Path | None = None) -> ConversionReport:
    """An HF Blip2ForImageTextRetrieval folder -> a stage-1 project folder.

    Writes ``model.safetensors`` (Stage1Model naming; LM head and temperature from the extras sidecar,
    ``extras`` or the one in ``src``), ``qformer_config.yaml`` (the sidecar's copy, else read off HF's
    config) and the vision tower in timm Eva naming (``vision_tower.safetensors``, usable as
    ``vision.checkpoint``; post_layernorm excluded: it is ``ln_vision``).
    """
    from dataclasses import replace

    from transformers import Blip2Config

    from blip2_ds.convert import check_against
    from blip2_ds.models.stage1 import Stage1Model

    src, out = Path(src), Path(out)
    config = Blip2Config.from_pretrained(src)
    sidecar = Path(extras) if extras is not None else src / EXTRAS_FILE
    meta = _read_meta(sidecar, _META_KEY_STAGE1)
    extra_state = read_state_dict(sidecar) if sidecar.is_file() else {}
    state = read_state_dict(src)
    tower = {n: t for n, t in state.items() if n.startswith(VISION) and not n.startswith(VISION + "post_layernorm")}
    result = convert({n: t for n, t in state.items() if n not in tower}, HF, OURS, extras=extra_state)
    report = result.report
    cfg = _qformer_config_from_hf(config, meta)
    if "qformer_config" not in meta:
        cfg = replace(cfg, embed_dim=config.image_text_hidden_size, vocab_size=config.qformer_config.vocab_size,
                      pad_token_id=config.qformer_config.pad_token_id)
    with torch.device("meta"):
        check_against(report, result.state_dict, Stage1Model(cfg))
    timm_tower = tower_from_hf(tower)
    report.frozen = sorted(tower)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(result.state_dict, out / MODEL_FILE, {"format": OURS})
    (out / CONFIG_FILE).write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    write_safetensors(timm_tower, out / TOWER_FILE, {"format": "timm"})
    return report


def export_checkpoint(checkpoint: str | Path, out: str | Path, overrides: list[str] | None = None) -> ConversionReport:
    """Command line ``to-hf`` for a training checkpoint: rebuild tower (and LLM) and model from its config.yaml;
    stage 1 -> Blip2ForImageTextRetrieval, stage 2 -> Blip2ForConditionalGeneration."""
    weights = resolve_weights(checkpoint)
    cfg = load_checkpoint_config(weights, overrides=overrides)
    tower, model = build_trained(cfg, weights, kernels="torch")
    if cfg.stage == 1:
        report = export_stage1(model, tower, out, cfg.pretrained.tokenizer_path or cfg.pretrained.bert_path,
                               cfg.pretrained.max_text_len)
    else:
        report = export_stage2(model, tower, out, cfg.generation)
    if cfg.vision.checkpoint is None:
        report.warnings.append("vision.checkpoint is null in the config: the exported vision tower is RANDOM.")
    return report


def checkpoint_stage(path: str | Path) -> int | None:
    """The ``stage`` of a checkpoint folder / run folder's config.yaml; None if there is no config.yaml."""
    try:
        config = resolve_weights(path).parent / "config.yaml"
    except ValueError:
        return None
    if not config.is_file():
        return None
    return (yaml.safe_load(config.read_text()) or {}).get("stage", 1)
