"""State-dict conversion between this project, the original LAVIS code and Hugging Face.

One table (``_RULES``) names every stage-1 tensor in the three layouts; each conversion is a
lookup in it. Tensors that belong to a frozen tower (the ViT) are carried through untouched
in their source naming, so a round trip loses nothing. What Hugging Face's
``Blip2ForImageTextRetrieval`` has no place for (the LM head, the temperature) travels in
an "extras" dict (a sidecar file on disk).

Command line (``python -m blip2_ds.convert --help``)::

    python -m blip2_ds.convert from-lavis blip2_pretrained.pth OUT_DIR
    python -m blip2_ds.convert from-hf    HF_DIR_OR_FILE       OUT_DIR
    python -m blip2_ds.convert to-lavis   OUT_DIR              blip2_stage1.pth
    python -m blip2_ds.convert to-hf      OUT_DIR              HF_OUT_DIR

A training checkpoint (``to-hf`` of a checkpoint / run folder with a config.yaml: stage 1 ->
``Blip2ForImageTextRetrieval``, stage 2 -> ``Blip2ForConditionalGeneration``) and ``from-hf`` of such a
complete HF folder convert the whole model, vision tower included: see :mod:`blip2_ds.hf_export`.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from blip2_ds.config import QFormerConfig, to_dict
from blip2_ds.state_io import read_state_dict, write_safetensors

OURS, LAVIS, HF = "ours", "lavis", "hf"
FORMATS = (OURS, LAVIS, HF)

_LAYER = "Qformer.bert.encoder.layer.{i}"
_HF_LAYER = "qformer.encoder.layer.{i}"
_RULES: list[tuple[str, str, str | None]] = [
    ("query_tokens", "query_tokens", "query_tokens"),
    ("ln_vision.{p}", "ln_vision.{p}", "vision_model.post_layernorm.{p}"),
    ("qformer.word_embeddings.weight", "Qformer.bert.embeddings.word_embeddings.weight",
     "embeddings.word_embeddings.weight"),
    ("qformer.position_embeddings.weight", "Qformer.bert.embeddings.position_embeddings.weight",
     "embeddings.position_embeddings.weight"),
    ("qformer.embed_norm.{p}", "Qformer.bert.embeddings.LayerNorm.{p}", "qformer.layernorm.{p}"),
    *[
        rule
        for ours_block, lavis_block, hf_block in (
            ("self_attn", "attention", "attention"),
            ("cross_attn", "crossattention", "crossattention"),
        )
        for rule in (
            (f"qformer.layers.{{i}}.{ours_block}.{{proj}}.{{p}}", f"{_LAYER}.{lavis_block}.self.{{proj}}.{{p}}",
             f"{_HF_LAYER}.{hf_block}.attention.{{proj}}.{{p}}"),
            (f"qformer.layers.{{i}}.{ours_block}.out.{{p}}", f"{_LAYER}.{lavis_block}.output.dense.{{p}}",
             f"{_HF_LAYER}.{hf_block}.output.dense.{{p}}"),
            (f"qformer.layers.{{i}}.{ours_block}.norm.{{p}}", f"{_LAYER}.{lavis_block}.output.LayerNorm.{{p}}",
             f"{_HF_LAYER}.{hf_block}.output.LayerNorm.{{p}}"),
        )
    ],
    *[
        rule
        for ours_ffn, suffix in (("text_ffn", ""), ("query_ffn", "_query"))
        for rule in (
            (f"qformer.layers.{{i}}.{ours_ffn}.up.{{p}}", f"{_LAYER}.intermediate{suffix}.dense.{{p}}",
             f"{_HF_LAYER}.intermediate{suffix}.dense.{{p}}"),
            (f"qformer.layers.{{i}}.{ours_ffn}.down.{{p}}", f"{_LAYER}.output{suffix}.dense.{{p}}",
             f"{_HF_LAYER}.output{suffix}.dense.{{p}}"),
            (f"qformer.layers.{{i}}.{ours_ffn}.norm.{{p}}", f"{_LAYER}.output{suffix}.LayerNorm.{{p}}",
             f"{_HF_LAYER}.output{suffix}.LayerNorm.{{p}}"),
        )
    ],
    ("qformer.lm_head.dense.{p}", "Qformer.cls.predictions.transform.dense.{p}", None),
    ("qformer.lm_head.norm.{p}", "Qformer.cls.predictions.transform.LayerNorm.{p}", None),
    ("qformer.lm_head.bias", "Qformer.cls.predictions.bias", None),
    ("vision_proj.{p}", "vision_proj.{p}", "vision_projection.{p}"),
    ("text_proj.{p}", "text_proj.{p}", "text_projection.{p}"),
    ("itm_head.{p}", "itm_head.{p}", "itm_head.{p}"),
    ("temp", "temp", None),
]

# Source keys that duplicate another tensor (tied weights, buffers): checked, not stored.
_LAVIS_DERIVED = {
    "Qformer.cls.predictions.decoder.weight": "qformer.word_embeddings.weight",
    "Qformer.cls.predictions.decoder.bias": "qformer.lm_head.bias",
}
_LAVIS_BUFFERS = ("Qformer.bert.embeddings.position_ids",)
# Frozen-tower tensors: carried through in their source naming.
_FROZEN_PREFIXES = {LAVIS: ("visual_encoder.",), HF: ("vision_model.",)}
_STAGE2_HINT = ("opt_", "t5_", "language_model.", "language_projection.", "llm_")

_PLACEHOLDERS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "proj": r"(?P<proj>query|key|value)"}


def compile_template(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, regex in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), regex)
    return re.compile(pattern + r"\Z")


_COMPILED = [
    {fmt: (None if tpl is None else (tpl, compile_template(tpl))) for fmt, tpl in zip(FORMATS, rule)} for rule in _RULES
]


def rename(name: str, source: str, target: str) -> str | None:
    """The name of tensor ``name`` (in layout ``source``) in layout ``target``; None if it has none.

    Raises KeyError when ``name`` is not a stage-1 tensor of ``source``.
    """
    for rule in _COMPILED:
        if rule[source] is None:
            continue
        match = rule[source][1].match(name)
        if match:
            return None if rule[target] is None else rule[target][0].format(**match.groupdict())
    raise KeyError(name)


@dataclass
class ConversionReport:
    """What a conversion did, for the user to read before trusting the result."""

    source: str
    target: str
    converted: int = 0
    frozen: list[str] = field(default_factory=list)
    """Frozen-tower tensors carried through unchanged."""
    extras: list[str] = field(default_factory=list)
    """Tensors the target layout has no place for (kept in the extras sidecar)."""
    unexpected: list[str] = field(default_factory=list)
    """Source tensors this converter does not know (not converted)."""
    missing: list[str] = field(default_factory=list)
    """Tensors the project's model has but the source did not provide (filled by `check_against`)."""
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.source} -> {self.target}: {self.converted} tensors converted"]
        if self.frozen:
            lines.append(f"  frozen-tower tensors carried through unchanged: {len(self.frozen)}")
        if self.extras:
            lines.append(f"  kept in the extras sidecar (no place in {self.target}): {', '.join(self.extras)}")
        for title, names in (("missing", self.missing), ("unexpected", self.unexpected)):
            shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
            lines.append(f"  {title} keys: {len(names)}" + (f": {shown}" if names else ""))
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


@dataclass
class Converted:
    state_dict: dict[str, torch.Tensor]
    """Stage-1 tensors in the target naming."""
    frozen: dict[str, torch.Tensor]
    """Frozen-tower tensors, still in the naming of ``frozen_format``."""
    frozen_format: str
    extras: dict[str, torch.Tensor]
    """Stage-1 tensors (project naming) that the target has no place for."""
    report: ConversionReport


def convert(state: dict[str, torch.Tensor], source: str, target: str,
            frozen: dict[str, torch.Tensor] | None = None, frozen_format: str | None = None,
            extras: dict[str, torch.Tensor] | None = None) -> Converted:
    """Convert a stage-1 state dict between layouts.

    ``frozen`` / ``extras`` come from an earlier :class:`Converted` (to complete a round trip).
    """
    report = ConversionReport(source, target)
    out: dict[str, torch.Tensor] = {}
    out_frozen = dict(frozen or {})
    out_frozen_format = frozen_format or source
    out_extras: dict[str, torch.Tensor] = {}
    ours: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if source == LAVIS and (name in _LAVIS_DERIVED or name in _LAVIS_BUFFERS):
            continue
        try:
            ours_name = rename(name, source, OURS)
        except KeyError:
            if name.startswith(_FROZEN_PREFIXES.get(source, ())):
                out_frozen[name] = tensor
                report.frozen.append(name)
            else:
                report.unexpected.append(name)
            continue
        ours[ours_name] = tensor
    for name, tensor in (extras or {}).items():
        ours.setdefault(name, tensor)
    if source == LAVIS:
        for derived, original in _LAVIS_DERIVED.items():
            if derived in state and original in ours and not torch.equal(state[derived], ours[original]):
                report.warnings.append(f"{derived} differs from the tensor it is tied to ({original}); "
                                       f"the tied tensor is used.")
    if any(name.startswith(_STAGE2_HINT) for name in report.unexpected):
        report.warnings.append("this looks like a stage-2 checkpoint (LLM / projection weights); "
                               "only the stage-1 tensors were converted.")
    for name, tensor in ours.items():
        target_name = rename(name, OURS, target)
        if target_name is None:
            out_extras[name] = tensor
            report.extras.append(name)
        else:
            out[target_name] = tensor
            report.converted += 1
    if target == LAVIS:
        for derived, original in _LAVIS_DERIVED.items():
            if original in ours:
                out[derived] = ours[original]
        max_positions = ours.get("qformer.position_embeddings.weight")
        if max_positions is not None:
            out[_LAVIS_BUFFERS[0]] = torch.arange(max_positions.shape[0])[None]
    if out_frozen and out_frozen_format != target:
        if target in _FROZEN_PREFIXES:
            report.warnings.append(
                f"{len(out_frozen)} frozen vision-tower tensors are in {out_frozen_format} naming and are not "
                f"mapped to {target}; they are kept aside (the vision tower's own conversion handles them).")
    return Converted(out, out_frozen, out_frozen_format, out_extras, report)


def check_against(report: ConversionReport, state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Fill ``report.missing`` / ``unexpected`` from loading ``state`` (project naming) into ``model``."""
    expected = model.state_dict()
    report.missing.extend(sorted(set(expected) - set(state)))
    report.unexpected.extend(sorted(set(state) - set(expected)))
    for name in sorted(set(expected) & set(state)):
        if expected[name].shape != state[name].shape:
            report.warnings.append(f"{name}: shape {tuple(state[name].shape)} in the source, "
                                   f"{tuple(expected[name].shape)} in the model")


def infer_qformer_config(state: dict[str, torch.Tensor], num_heads: int | None = None) -> QFormerConfig:
    """Read the Q-Former's shape off a project-layout state dict (head count: head dim 64 unless given)."""
    try:
        word = state["qformer.word_embeddings.weight"]
        queries = state["query_tokens"]
        layer_ids = {int(m.group(1)) for k in state if (m := re.match(r"qformer\.layers\.(\d+)\.", k))}
        cross = sorted({int(m.group(1)) for k in state if (m := re.match(r"qformer\.layers\.(\d+)\.cross_attn\.", k))})
        hidden = word.shape[1]
        return QFormerConfig(
            vocab_size=word.shape[0],
            hidden_size=hidden,
            num_layers=len(layer_ids),
            num_heads=num_heads or max(1, hidden // 64),
            intermediate_size=state["qformer.layers.0.text_ffn.up.weight"].shape[0],
            max_position_embeddings=state["qformer.position_embeddings.weight"].shape[0],
            cross_attention_freq=cross[1] - cross[0] if len(cross) > 1 else max(1, len(layer_ids)),
            num_query_tokens=queries.shape[1],
            vision_width=state["ln_vision.weight"].shape[0],
            embed_dim=state["vision_proj.weight"].shape[0],
        )
    except (KeyError, IndexError) as err:
        raise ValueError(f"cannot infer the Q-Former shape: the state dict lacks {err}.") from None


# ---- files ---------------------------------------------------------------------------------
MODEL_FILE = "model.safetensors"
FROZEN_FILE = "frozen_towers.safetensors"
EXTRAS_FILE = "blip2_ds_extras.safetensors"
CONFIG_FILE = "qformer_config.yaml"


def _load_project_dir(path: Path) -> tuple[dict, dict, str | None]:
    from safetensors import safe_open

    if not (path / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{path}: expected {MODEL_FILE} written by `blip2_ds.convert from-*`.")
    state = read_state_dict(path / MODEL_FILE)
    frozen, frozen_format = {}, None
    if (path / FROZEN_FILE).is_file():
        frozen = read_state_dict(path / FROZEN_FILE)
        with safe_open(str(path / FROZEN_FILE), "pt") as handle:
            frozen_format = (handle.metadata() or {}).get("format")
    return state, frozen, frozen_format


def _write_project_dir(result: Converted, out: Path, num_heads: int | None) -> None:
    from blip2_ds.models.stage1 import Stage1Model

    cfg = infer_qformer_config(result.state_dict, num_heads)
    with torch.device("meta"):
        model = Stage1Model(cfg)
    check_against(result.report, result.state_dict, model)
    write_safetensors(result.state_dict, out / MODEL_FILE, {"format": OURS})
    (out / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if result.frozen:
        write_safetensors(result.frozen, out / FROZEN_FILE, {"format": result.frozen_format})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip2_ds.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("direction", choices=["from-lavis", "from-hf", "to-lavis", "to-hf"])
    parser.add_argument("src", type=Path, help="source checkpoint file or folder")
    parser.add_argument("dst", type=Path, help="output file (to-lavis) or folder")
    parser.add_argument("--num-heads", type=int, default=None, help="Q-Former heads (default: width / 64)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow .pth files that also hold Python objects (only for files you trust)")
    parser.add_argument("--extras", type=Path, default=None,
                        help="from-hf: sidecar written by to-hf (LM head, temperature); default: looked up beside SRC")
    args = parser.parse_args(argv)
    direction, fmt = args.direction.split("-")
    try:
        if fmt == HF:  # a training checkpoint / a whole HF BLIP-2 folder, vision tower included (blip2_ds/hf_export.py)
            from blip2_ds import hf_export

            if direction == "to" and hf_export.checkpoint_stage(args.src) in (1, 2):
                return _print(hf_export.export_checkpoint(args.src, args.dst))
            if direction == "from" and hf_export.is_stage2_hf_folder(args.src):
                return _print(hf_export.import_stage2(args.src, args.dst))
            if direction == "from" and hf_export.is_stage1_hf_folder(args.src):
                return _print(hf_export.import_stage1(args.src, args.dst, args.extras))
        if direction == "from":
            state = read_state_dict(args.src, trust_pickle=args.trust_pickle)
            extras = {}
            sidecar = args.extras or (args.src / EXTRAS_FILE if args.src.is_dir() else None)
            if fmt == HF and sidecar is not None and sidecar.is_file():
                extras = read_state_dict(sidecar)
            result = convert(state, fmt, OURS, extras=extras)
            _write_project_dir(result, args.dst, args.num_heads)
        else:
            state, frozen, frozen_format = _load_project_dir(args.src)
            result = convert(state, OURS, fmt, frozen=frozen, frozen_format=frozen_format)
            final = dict(result.state_dict)
            if result.frozen_format == fmt:
                final.update(result.frozen)
            if fmt == LAVIS:
                args.dst.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"model": final}, args.dst)
            else:
                write_safetensors(final, args.dst / MODEL_FILE, {"format": "pt"})
                if result.extras:
                    write_safetensors(result.extras, args.dst / EXTRAS_FILE, {"format": OURS})
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return _print(result.report)


def _print(report: ConversionReport) -> int:
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
