"""The frozen LLM of stage 2 (OPT or FlanT5), read from a local Hugging Face folder.

The LLM is only a conditional text model here: stage 2 trains the Q-Former and a projection
into the LLM's input-embedding space, and never updates the LLM. So the wrapper freezes it
for good: every parameter has ``requires_grad=False`` (no gradient buffers, nothing for an
optimizer to find), it stays in eval mode whatever ``train()`` is called with (no dropout
in the frozen network, as in the original), and its weights are stored in
``LanguageConfig.dtype`` (bf16 by default: 2 bytes per parameter).

Every way a folder can be unusable is a :class:`ConfigError` naming ``language.path`` or
``language.kind``, raised before any weights are read. Nothing is ever downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from blip2_ds.config import ConfigError, LanguageConfig

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# LanguageConfig.kind -> the HF ``model_type`` values that architecture may carry.
MODEL_TYPES = {"opt": ("opt",), "t5": ("t5", "mt5", "umt5")}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model")


class FrozenLanguageModel(nn.Module):
    """A transformers LLM plus its tokenizer, frozen (see the module docstring).

    ``end_token_ids`` are the tokens that end a generated text: for OPT the "\\n" that every
    training caption ends with (the BLIP-2 recipe) as well as ``</s>``; for T5 ``</s>``.
    """

    def __init__(self, model: nn.Module, tokenizer, cfg: LanguageConfig):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.kind = cfg.kind
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.train(False)
        end = [tokenizer.eos_token_id]
        if cfg.kind == "opt":
            newline = tokenizer("\n", add_special_tokens=False).input_ids
            if len(newline) != 1:
                raise ConfigError(f"language.path={cfg.path}: the tokenizer splits '\\n' into {newline}; "
                                  f"the OPT recipe needs it as one end-of-caption token.")
            end.insert(0, newline[0])
        self.end_token_ids = end

    def train(self, mode: bool = True) -> "FrozenLanguageModel":
        """Always eval: a frozen network must not get dropout when the trainer calls ``train()``."""
        return super().train(False)

    @property
    def hidden_size(self) -> int:
        """Width of the input embeddings (what the soft prompt must match)."""
        return self.model.get_input_embeddings().embedding_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> the LLM's input embeddings (B, T, hidden)."""
        return self.model.get_input_embeddings()(ids)


def _check_folder(cfg: LanguageConfig) -> Path:
    if cfg.path is None:
        raise ConfigError("language.path is not set: give a local HF folder of the LLM "
                          "(e.g. facebook/opt-2.7b downloaded beforehand).")
    path = Path(cfg.path)
    if not path.is_dir():
        raise ConfigError(f"language.path={path} is not a local directory (HF format expected; nothing is downloaded).")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"language.path={path}: {config_file.name} is missing.")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in MODEL_TYPES[cfg.kind]:
        raise ConfigError(f"language.kind={cfg.kind!r} but language.path={path} holds a {model_type!r} model; "
                          f"set language.kind to match the folder (opt or t5).")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise ConfigError(f"language.path={path}: no weights (looked for {', '.join(_WEIGHT_FILES)}).")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ConfigError(f"language.path={path}: no tokenizer (looked for {', '.join(_TOKENIZER_FILES)}).")
    return path


def _blip2_llm_config(path: Path):
    """The folder's config, as BLIP-2 runs it: FlanT5's gated GELU exact, not tanh-approximated as the folder
    says (LAVIS's blip2_t5.py sets ``dense_act_fn="gelu"``, and so does HF's BLIP-2 conversion). The frozen
    LLM must compute what it computed when BLIP-2's Q-Formers were trained against it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if config.model_type in MODEL_TYPES["t5"] and getattr(config, "dense_act_fn", None) == "gelu_new":
        config.dense_act_fn = "gelu"
    return config


def build_language_model(cfg: LanguageConfig) -> FrozenLanguageModel:
    """Load the frozen LLM and its tokenizer from ``cfg.path`` (local files only)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    cfg.validate()
    path = _check_folder(cfg)
    try:
        # OPT: right padding for training batches (the BLIP-2 recipe); generation builds its own.
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, padding_side="right")
    except (OSError, ValueError) as err:
        raise ConfigError(f"language.path={path}: cannot load the tokenizer: {err}") from None
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ConfigError(f"language.path={path}: the tokenizer defines no pad or eos token.")
    if cfg.kind == "opt" and tokenizer.bos_token_id is None:
        raise ConfigError(f"language.path={path}: the OPT tokenizer defines no bos token (OPT's is </s>).")
    auto = AutoModelForCausalLM if cfg.kind == "opt" else AutoModelForSeq2SeqLM
    try:
        model = auto.from_pretrained(str(path), local_files_only=True, dtype=TORCH_DTYPES[cfg.dtype],
                                     config=_blip2_llm_config(path))
    except (OSError, ValueError) as err:
        raise ConfigError(f"language.path={path}: cannot load the {cfg.kind} model: {err}") from None
    return FrozenLanguageModel(model, tokenizer, cfg)
