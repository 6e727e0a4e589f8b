"""Starting points read from local files: a BERT checkpoint for the Q-Former, the BERT tokenizer.

As the original does: BERT's embeddings, self-attention and feed-forward weights are copied,
the word embeddings (and the LM-head bias) grow by one row for ``[DEC]``, the text feed-forward
is copied into the query feed-forward, and cross-attention stays randomly initialised. BERT's
token-type embeddings and pooler have no place in the Q-Former and are dropped (as in LAVIS).
Nothing is ever downloaded: paths must be local folders.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from blip2_ds.config import ConfigError, QFormerConfig
from blip2_ds.convert import LAVIS, rename
from blip2_ds.models.qformer import QFormer
from blip2_ds.state_io import read_state_dict

DECODER_BOS_TOKEN = "[DEC]"

# BERT config.json field -> (QFormerConfig field)
_BERT_SHAPE_FIELDS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
}


@dataclass
class BertInitReport:
    loaded: list[str] = field(default_factory=list)
    """Q-Former tensors copied from the checkpoint."""
    random: list[str] = field(default_factory=list)
    """Q-Former tensors left at their random init (cross-attention; LM head if the checkpoint has none)."""
    ignored: list[str] = field(default_factory=list)
    """Checkpoint tensors with no place in the Q-Former."""

    def summary(self) -> str:
        return (f"BERT init: {len(self.loaded)} tensors loaded, {len(self.random)} left random, "
                f"{len(self.ignored)} checkpoint tensors ignored ({', '.join(self.ignored[:6])}"
                f"{', ...' if len(self.ignored) > 6 else ''})")


def _require_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{what}: {path} is not a local directory (HF format expected; nothing is downloaded).")
    return path


def check_bert_config(bert_dir: str | Path, cfg: QFormerConfig) -> dict:
    """Compare the checkpoint's config.json with ``cfg``; raise naming every mismatching field."""
    bert_dir = _require_dir(bert_dir, "pretrained.bert_path")
    config_file = bert_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"pretrained.bert_path: {config_file} is missing.")
    bert = json.loads(config_file.read_text())
    mismatches = [
        f"model.{ours}={getattr(cfg, ours)} but {config_file} has {theirs}={bert[theirs]}"
        for theirs, ours in _BERT_SHAPE_FIELDS.items()
        if theirs in bert and bert[theirs] != getattr(cfg, ours)
    ]
    if bert.get("vocab_size", cfg.vocab_size - 1) + 1 != cfg.vocab_size:
        mismatches.append(f"model.vocab_size={cfg.vocab_size} but {config_file} has vocab_size="
                          f"{bert['vocab_size']} (+1 for [DEC] = {bert['vocab_size'] + 1})")
    if mismatches:
        raise ConfigError("the Q-Former does not match the BERT checkpoint: " + "; ".join(mismatches)
                          + ". Set these model fields to the checkpoint's values.")
    return bert


def _bert_to_lavis_name(name: str) -> str:
    name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)  # older BERT checkpoints' names (what
    name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)  # transformers renames when it loads them)
    name = re.sub(r"^bert\.", "", name)
    if name.startswith("cls."):
        return "Qformer." + name
    return "Qformer.bert." + name


def load_bert_into_qformer(qformer: QFormer, bert_dir: str | Path) -> BertInitReport:
    """Initialise ``qformer`` (in place) from a local HF BERT checkpoint folder."""
    check_bert_config(bert_dir, qformer.cfg)
    source = read_state_dict(bert_dir)
    targets = dict(qformer.named_parameters())
    report = BertInitReport()
    with torch.no_grad():
        for name, tensor in source.items():
            try:
                ours = rename(_bert_to_lavis_name(name), LAVIS, "ours")
            except KeyError:
                report.ignored.append(name)
                continue
            if ours is None or not ours.startswith("qformer."):
                report.ignored.append(name)
                continue
            ours = ours[len("qformer."):]
            copies = [ours]
            if ".text_ffn." in ours:
                copies.append(ours.replace(".text_ffn.", ".query_ffn."))
            for target_name in copies:
                target = targets[target_name]
                if target_name in ("word_embeddings.weight", "lm_head.bias"):
                    # One more row/entry for [DEC]: keep the new one at its random / zero init.
                    target[: tensor.shape[0]].copy_(tensor)
                else:
                    target.copy_(tensor)
                report.loaded.append(target_name)
    report.random = sorted(set(targets) - set(report.loaded))
    # New in BLIP-2: the cross-attention; absent from encoder-only checkpoints: the MLM head. Anything else left
    # random means the checkpoint's names were not understood, and training would start from a broken BERT.
    unexpected = [name for name in report.random if ".cross_attn." not in name and not name.startswith("lm_head.")]
    if unexpected:
        raise ConfigError(f"pretrained.bert_path {bert_dir}: {len(unexpected)} Q-Former tensors found no tensor in the "
                          f"checkpoint ({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''}); its "
                          f"names are not BERT's ({', '.join(report.ignored[:4])} were not placed).")
    return report


def load_tokenizer(tokenizer_dir: str | Path, max_length: int = 32):
    """The Q-Former's BERT tokenizer from a local folder, with ``[DEC]`` added as bos token."""
    from transformers import AutoTokenizer

    tokenizer_dir = _require_dir(tokenizer_dir, "pretrained.tokenizer_path")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True,
                                              truncation_side="right", model_max_length=max_length)
    tokenizer.add_special_tokens({"bos_token": DECODER_BOS_TOKEN})
    return tokenizer
