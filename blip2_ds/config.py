"""Typed configuration: dataclasses, YAML loading, ``key=value`` overrides, validation.

Every field carries a docstring (the string literal under it); ``tests/test_config.py``
enforces that. Unknown keys in a YAML file or an override are an error that names them,
so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the field and the fix."""


@dataclass
class QFormerConfig:
    """Shape of the Q-Former (BERT-style) and of the heads around it."""

    vocab_size: int = 30523
    """Text vocabulary, including the added ``[DEC]`` token (bert-base-uncased: 30522 + 1)."""
    hidden_size: int = 768
    """Width of the Q-Former (BERT-base: 768)."""
    num_layers: int = 12
    """Number of transformer layers (BERT-base: 12)."""
    num_heads: int = 12
    """Attention heads per layer; must divide ``hidden_size``."""
    intermediate_size: int = 3072
    """Inner width of each feed-forward block (BERT-base: 3072)."""
    max_position_embeddings: int = 512
    """Absolute text position embeddings (queries get none)."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon inside the Q-Former (BERT: 1e-12)."""
    hidden_dropout: float = 0.1
    """Dropout on embeddings and on every residual branch."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    cross_attention_freq: int = 2
    """A cross-attention block sits in every layer whose index is a multiple of this (0, 2, 4, ...)."""
    num_query_tokens: int = 32
    """Number of learned queries."""
    vision_width: int = 1408
    """Width of the frozen image features (EVA ViT-g/14: 1408; CLIP ViT-L/14: 1024)."""
    vision_norm_eps: float = 1e-5
    """Epsilon of ``ln_vision``, the fp32 LayerNorm on the frozen image features (original: 1e-5)."""
    embed_dim: int = 256
    """Width of the contrastive space (``vision_proj`` / ``text_proj`` outputs)."""
    init_std: float = 0.02
    """Std of the normal init of queries, linears and embeddings not loaded from BERT."""
    pad_token_id: int = 0
    """Id of the text padding token (BERT's ``[PAD]``)."""

    def validate(self, where: str = "model") -> None:
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ConfigError(
                f"{where}.hidden_size={self.hidden_size} is not divisible by "
                f"{where}.num_heads={self.num_heads}; pick a head count that divides it."
            )
        if self.cross_attention_freq < 1:
            raise ConfigError(f"{where}.cross_attention_freq must be >= 1, got {self.cross_attention_freq}.")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{where}.{name} must be in [0, 1), got {value}.")
        for name in ("num_layers", "num_query_tokens", "vision_width", "embed_dim", "vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be positive, got {getattr(self, name)}.")


@dataclass
class ObjectiveConfig:
    """The three stage-1 objectives (ITC, ITM, ITG) and the temperature."""

    itc_weight: float = 1.0
    """Weight of the image-text contrastive loss in the total."""
    itm_weight: float = 1.0
    """Weight of the image-text matching loss (with hard negatives) in the total."""
    itg_weight: float = 1.0
    """Weight of the image-grounded text generation loss in the total."""
    label_smoothing: float = 0.1
    """Label smoothing of the ITC and ITG cross-entropies (the original: 0.1); ITM uses none."""
    temperature_init: float = 0.07
    """Initial value of the learnable ITC temperature."""
    temperature_min: float = 0.001
    """Lower clamp of the temperature (BLIP-1's bound, which the BLIP-2 code forgot)."""
    temperature_max: float = 0.5
    """Upper clamp of the temperature."""
    negative_sampling_seed: int = 0
    """Base seed of the hard-negative draw; combined with the step it is the same on every rank."""

    def validate(self, where: str = "objectives") -> None:
        if not 0.0 < self.temperature_min <= self.temperature_init <= self.temperature_max:
            raise ConfigError(
                f"{where}: need 0 < temperature_min <= temperature_init <= temperature_max, got "
                f"{self.temperature_min}, {self.temperature_init}, {self.temperature_max}."
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"{where}.label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        weights = (self.itc_weight, self.itm_weight, self.itg_weight)
        if min(weights) < 0 or max(weights) == 0:
            raise ConfigError(f"{where}: loss weights must be >= 0 and not all zero, got {weights}.")


@dataclass
class PretrainedConfig:
    """Local files the model starts from (never downloaded)."""

    bert_path: str | None = None
    """HF-format BERT directory (config.json + weights) to initialise the Q-Former from; None = random init."""
    tokenizer_path: str | None = None
    """HF-format BERT tokenizer directory (vocab.txt / tokenizer.json); defaults to ``bert_path``."""
    max_text_len: int = 32
    """Captions are tokenized to this many tokens (right truncation, padded), [CLS]/[SEP] included."""
    qformer_checkpoint: str | None = None
    """Stage 2: start the Q-Former from this stage-1 checkpoint (a run's ``model.safetensors``, a LAVIS ``.pth``
    or an HF folder); the text parts are dropped."""
    qformer_checkpoint_format: str = "ours"
    """Layout of ``qformer_checkpoint``: ``ours``, ``lavis`` or ``hf``."""


DTYPES = ("bf16", "fp16", "fp32")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
"""Values of ``VisionConfig.compile``: off, or a ``torch.compile`` mode."""
KERNEL_BACKENDS = ("auto", "triton", "torch")
"""Values of ``Config.kernels`` (see :mod:`blip2_ds.kernels`)."""


def _check_choice(value: str, choices: tuple[str, ...], where: str) -> None:
    if value not in choices:
        raise ConfigError(f"{where}={value!r} is not one of {', '.join(choices)}.")


@dataclass
class VisionConfig:
    """The frozen image encoder, built with open_clip from local files."""

    model_name: str = "EVA01-g-14"
    """open_clip model name: EVA01-g-14 (BLIP-2's ViT-g), ViT-L-14-quickgelu (BLIP-2's ViT-L, OpenAI CLIP's
    QuickGELU; plain ViT-L-14 has GELU), or any open_clip ViT."""
    model_config: str | None = None
    """Path to an open_clip model-config JSON for a custom tower (tiny test models); replaces the named config."""
    checkpoint: str | None = None
    """Local weights: an open_clip / timm checkpoint or the original BLIP-2 ``eva_vit_g.pth``; None = random."""
    image_size: int = 224
    """Input resolution; position embeddings are interpolated when it differs from the checkpoint's (364 for captioning)."""
    dtype: str = "bf16"
    """Storage and compute dtype of the frozen tower: bf16, fp16 or fp32."""
    compile: str = "off"
    """torch.compile the tower's forward during training: ``off``; ``default`` (inductor: norms, activations
    and residual adds fused around the GEMMs); ``reduce-overhead`` (the same replayed as a CUDA graph, with
    the output copied out of the graph's buffer); ``max-autotune-no-cudagraphs`` (GEMM autotuning too).
    Shapes are static: every new batch shape compiles once (minutes for ViT-g), so keep the batch fixed."""

    def validate(self, where: str = "vision") -> None:
        _check_choice(self.dtype, DTYPES, f"{where}.dtype")
        _check_choice(self.compile, COMPILE_MODES, f"{where}.compile")
        if self.image_size < 1:
            raise ConfigError(f"{where}.image_size must be positive, got {self.image_size}.")


@dataclass
class LanguageConfig:
    """The frozen LLM of stage 2, built with transformers from a local folder."""

    kind: str = "opt"
    """``opt`` (decoder-only: soft tokens before the text) or ``t5`` (encoder-decoder: soft tokens before the encoder input)."""
    path: str | None = None
    """Local HF folder with config.json, weights and tokenizer (e.g. facebook/opt-2.7b downloaded beforehand)."""
    dtype: str = "bf16"
    """Storage and compute dtype of the frozen LLM: bf16 (T5 must not run in fp16), fp16 or fp32."""
    max_text_len: int = 32
    """LLM tokens per caption (OPT: prompt + caption + "\\n"; T5: the decoder target)."""
    prompt: str = ""
    """Text prompt before every caption (e.g. "a photo of"); it gets no loss."""
    length_groups: int = 2
    """Training runs the frozen LLM on each micro batch in at most this many groups of similar caption
    length, each padded only to its own longest row, instead of one batch padded to the longest (the
    original); the loss is the same token mean. Fewer pad positions, more (smaller) LLM calls; 1 = one
    padded batch. The groups are planned in the data workers (``models/length_groups.py``)."""

    def validate(self, where: str = "language") -> None:
        _check_choice(self.kind, ("opt", "t5"), f"{where}.kind")
        _check_choice(self.dtype, DTYPES, f"{where}.dtype")
        if not isinstance(self.length_groups, int) or self.length_groups < 1:
            raise ConfigError(f"{where}.length_groups must be a whole number >= 1 (1 = one padded batch), "
                              f"got {self.length_groups!r}.")


@dataclass
class GenerationConfig:
    """Caption / answer generation with the stage-2 model."""

    num_beams: int = 5
    """Beam width for beam search (ignored when sampling)."""
    max_new_tokens: int = 30
    """Longest generated text, in LLM tokens."""
    min_new_tokens: int = 5
    """Shortest generated text, in LLM tokens (captioning evaluations use 8)."""
    repetition_penalty: float = 1.5
    """Penalty on repeated tokens (1.0 = none)."""
    length_penalty: float = 1.0
    """Beam-search length penalty (VQA uses -1)."""
    use_nucleus_sampling: bool = False
    """Sample with nucleus (top-p) sampling instead of beam search."""
    top_p: float = 0.9
    """Nucleus mass kept when sampling."""
    temperature: float = 1.0
    """Sampling temperature."""
    num_captions: int = 1
    """Texts returned per image (beam search: the best ``num_captions`` beams)."""

    def validate(self, where: str = "generation") -> None:
        for name in ("num_beams", "max_new_tokens", "num_captions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be >= 1, got {getattr(self, name)}.")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"{where}: need 0 <= min_new_tokens <= max_new_tokens, got {self.min_new_tokens} and "
                              f"{self.max_new_tokens}.")
        if not self.use_nucleus_sampling and self.num_captions > self.num_beams:
            raise ConfigError(f"{where}.num_captions={self.num_captions} exceeds num_beams={self.num_beams}: beam search "
                              f"returns at most one text per beam.")
        if not (0 < self.top_p <= 1 and self.temperature > 0 and self.repetition_penalty > 0):
            raise ConfigError(f"{where}: need 0 < top_p <= 1, temperature > 0 and repetition_penalty > 0, got "
                              f"{self.top_p}, {self.temperature}, {self.repetition_penalty}.")


@dataclass
class DataSource:
    """One source of tar shards (COCO, CC3M, LAION, ...)."""

    urls: str
    """Shard URLs: a local path, a brace pattern (data/cc3m-{00000..00331}.tar) or a ``pipe:`` command."""
    weight: float = 1.0
    """Exact mode: how many times its shards appear per epoch (a whole number). Resampled mode: a
    multiplier on its share of the draws (1 everywhere = every sample equally likely)."""
    num_samples: int | None = None
    """Total samples of the source; only needed when its shards have no ``*_stats.json`` and cannot be scanned (pipe:)."""


@dataclass
class DataConfig:
    """Streaming image-text pairs from WebDataset tar shards."""

    train: str | None = None
    """Shorthand for one source: ``data.train=data/cc3m-{00000..00331}.tar``."""
    sources: list[DataSource] = field(default_factory=list)
    """Several sources mixed with weights (used together with ``train`` if both are given)."""
    mode: str = "exact"
    """``exact``: every shard once per epoch, shuffled by seed + epoch; ``resampled``: shards drawn with replacement."""
    balance: str = "repeat"
    """Exact mode, when the (rank, worker) readers hold different sample counts: ``repeat`` (short readers
    wrap around, so no sample is left out, as torch's DistributedSampler pads) or ``drop`` (long readers stop
    early, so no sample repeats)."""
    epoch_samples: int | None = None
    """Resampled mode: samples per virtual epoch over all ranks (default: the total of the sources)."""
    batch_size: int = 8
    """Samples per batch on each rank (the micro batch)."""
    num_workers: int = 4
    """Decoding worker processes per rank (0 = decode in the training process)."""
    prefetch_batches: int = 2
    """Batches each worker prepares ahead."""
    image_size: int = 224
    """Side of the square training images (364 for captioning fine-tunes)."""
    crop_scale: tuple[float, float] = (0.5, 1.0)
    """Area range of RandomResizedCrop, as a fraction of the image."""
    hflip: bool = True
    """Random horizontal flips (the recipe); turn off when captions name left and right (the demo does)."""
    color_jitter: float = 0.0
    """Strength of brightness/contrast/saturation jitter (0 = off), applied on the device."""
    reduced_decode: bool = True
    """Decode JPEGs at 1/2 scale or less (in the DCT domain) when the crop still covers ``image_size`` pixels."""
    max_words: int = 50
    """Captions are cut to this many words after cleaning."""
    prompt: str = ""
    """Text put before every cleaned caption (stage 1; stage 2's LLM prompt is ``language.prompt``)."""
    image_extensions: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    """Tar member extensions taken as the image, in order of preference."""

    def validate(self, where: str = "data") -> None:
        _check_choice(self.mode, ("exact", "resampled"), f"{where}.mode")
        _check_choice(self.balance, ("repeat", "drop"), f"{where}.balance")
        unknown = sorted(set(self.image_extensions) - {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
        if unknown or not self.image_extensions:
            raise ConfigError(f"{where}.image_extensions: unsupported {unknown or 'empty list'}; "
                              f"use some of jpg, jpeg, png, webp, bmp, gif, tif, tiff.")
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ConfigError(f"{where}.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}.")
        for name in ("batch_size", "image_size", "max_words", "prefetch_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be positive, got {getattr(self, name)}.")
        if self.num_workers < 0:
            raise ConfigError(f"{where}.num_workers must be >= 0, got {self.num_workers}.")
        for i, source in enumerate(self.sources):
            if source.weight <= 0:
                raise ConfigError(f"{where}.sources[{i}].weight must be > 0, got {source.weight}.")
            if self.mode == "exact" and source.weight != int(source.weight):
                raise ConfigError(f"{where}.sources[{i}].weight={source.weight}: exact mode repeats shards a whole "
                                  f"number of times per epoch; use a whole number or mode=resampled.")

    def all_sources(self) -> list[DataSource]:
        return ([DataSource(self.train)] if self.train else []) + list(self.sources)


@dataclass
class OptimConfig:
    """AdamW, the learning-rate schedule, clipping and the batch decomposition."""

    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine (stage 1: 0; stage 2 recipe: 5e-5)."""
    warmup_steps: int = 2000
    """Linear warmup from ``warmup_start_lr`` to ``lr`` over this many optimizer steps; then cosine per step to ``min_lr``."""
    warmup_start_lr: float = 0.0
    """Learning rate of the first optimizer step (the original configs start at 1e-6)."""
    weight_decay: float = 0.05
    """AdamW weight decay; never applied to biases, norms or other 1-D parameters (the temperature included)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    global_batch: int | None = None
    """Samples per optimizer step over all ranks (recipe: 1680 ViT-g / 2320 ViT-L stage 1, 1920 OPT / 1520 FlanT5
    stage 2), reached as data.batch_size x ranks x accumulation; None = one micro batch per rank per step."""

    def validate(self, where: str = "optim") -> None:
        numbers = {"lr": self.lr, "min_lr": self.min_lr, "warmup_start_lr": self.warmup_start_lr,
                   "weight_decay": self.weight_decay, "eps": self.eps, "grad_clip": self.grad_clip}
        bad = [f"{name}={value}" for name, value in numbers.items() if not math.isfinite(value)]
        if bad:
            raise ConfigError(f"{where}: {', '.join(bad)}: must be finite numbers.")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"{where}: need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}.")
        if not 0 <= self.warmup_start_lr <= self.lr:
            raise ConfigError(f"{where}: need 0 <= warmup_start_lr <= lr, got {self.warmup_start_lr} and lr={self.lr}.")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError(f"{where}: warmup_steps, grad_clip and weight_decay must be >= 0.")
        if self.eps <= 0 or not all(0 <= beta < 1 for beta in self.betas):
            raise ConfigError(f"{where}: need eps > 0 and betas in [0, 1), got eps={self.eps}, betas={self.betas}.")


@dataclass
class Config:
    """Everything one run needs."""

    model: QFormerConfig = field(default_factory=QFormerConfig)
    """The Q-Former and its heads."""
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Loss weights, label smoothing, temperature."""
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)
    """Local checkpoints and tokenizer."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """The frozen image encoder."""
    language: LanguageConfig = field(default_factory=LanguageConfig)
    """The frozen LLM (stage 2 only)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Generation settings (stage 2 only)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data stream."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer, schedule, clipping, global batch."""
    stage: int = 1
    """1: representation learning (ITC + ITM + ITG, frozen ViT); 2: generative learning with the frozen LLM."""
    seed: int = 42
    """Global seed (model init, data order, dropout)."""
    output_dir: str = "runs/default"
    """Where checkpoints, logs and TensorBoard events go."""
    max_steps: int = 250_000
    """Optimizer steps of the run (recipe: 250k stage 1, 80k stage 2); also the length of the cosine."""
    save_every: int = 10_000
    """Checkpoint every this many optimizer steps (and always at the end and on SIGTERM/SIGUSR1)."""
    keep_last: int = 3
    """Checkpoints kept on disk (older ones are deleted once a newer one is complete)."""
    log_every: int = 50
    """Steps between log lines and TensorBoard scalars."""
    precision: str = "bf16"
    """Trainable-module precision: bf16 (default), fp16 (dynamic loss scaling) or fp32."""
    max_nonfinite_steps: int = 10
    """A non-finite loss skips the step; this many in a row stop the run (the last good checkpoint stays)."""
    eval_every: int = 0
    """Evaluate every this many optimizer steps on ``eval_data`` during training (0 = never): retrieval R@k
    (stage 1) or BLEU / ROUGE-L / CIDEr of generated captions (stage 2), to TensorBoard under ``eval/``."""
    eval_data: str | None = None
    """Held-out tar shards (brace pattern) for ``eval_every``; one caption per sample."""
    eval_samples: int = 256
    """How many held-out samples each periodic evaluation uses (the first ones of ``eval_data``)."""
    kernels: str = "auto"
    """Fused kernels for the Q-Former's cross-attention and the ITC similarity: auto (the Triton kernel where it was
    measured to pay, on CUDA, after a first-use check against torch; torch/SDPA elsewhere), triton (always; on a CPU
    only inside Triton's interpreter, TRITON_INTERPRET=1, for tests) or torch."""
    apex: bool = False
    """Use NVIDIA apex's FusedLayerNorm (Q-Former) and FusedAdam when apex is importable; without apex: a warning and
    torch's own. Never required."""
    activation_checkpointing: bool = False
    """Recompute each Q-Former layer in backward instead of keeping its activations: about a third more Q-Former
    compute for a larger micro batch (same losses and gradients; see QFormer.checkpoint_layers)."""
    profile_steps: int | str = ""
    """Record these optimizer steps with torch's profiler on every rank, e.g. ``100-102`` or ``100`` (counted from 1 as
    in the log; "" or 0 = off): a Chrome trace and an operator table per rank under ``output_dir/profile/``
    (see train/profiling.py)."""

    memory_snapshot: bool = False
    """CUDA only: record the GPU allocator's history during the loop and, if a rank runs out of memory, write its
    snapshot to ``output_dir/memory/`` for https://pytorch.org/memory_viz (see train/memory.py). Costs host time per
    allocation: for rerunning a run that ran out of memory."""

    def profiled_steps(self) -> tuple[int, int] | None:
        """``profile_steps`` as (first, last), or None when off; ConfigError when it is not a step range within max_steps."""
        if not self.profile_steps:
            return None
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", str(self.profile_steps).strip())
        if match is None:
            raise ConfigError(f"profile_steps={self.profile_steps!r}: give a step or a range of optimizer steps, "
                              "e.g. 100 or 100-102.")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if not 1 <= first <= last <= self.max_steps:
            raise ConfigError(f"profile_steps={self.profile_steps!r}: the steps must satisfy "
                              f"1 <= first <= last <= max_steps={self.max_steps}.")
        return first, last

    def validate(self) -> None:
        self.model.validate("model")
        self.objectives.validate("objectives")
        self.vision.validate("vision")
        self.language.validate("language")
        self.data.validate("data")
        self.optim.validate("optim")
        self.generation.validate("generation")
        if self.vision.image_size != self.data.image_size:
            raise ConfigError(f"vision.image_size={self.vision.image_size} and data.image_size={self.data.image_size} "
                              f"differ: the tower reads the images the data makes; set both (e.g. 364 for captioning).")
        _check_choice(self.pretrained.qformer_checkpoint_format, ("ours", "lavis", "hf"),
                      "pretrained.qformer_checkpoint_format")
        _check_choice(self.precision, DTYPES, "precision")
        _check_choice(self.kernels, KERNEL_BACKENDS, "kernels")
        self.profiled_steps()
        if self.eval_every < 0 or self.eval_samples < 1:
            raise ConfigError(f"eval_every must be >= 0 and eval_samples >= 1, got {self.eval_every}, {self.eval_samples}.")
        if self.eval_every and not self.eval_data:
            raise ConfigError(f"eval_every={self.eval_every} needs eval_data (held-out shards, e.g. "
                              "data/val-{00000..00003}.tar).")
        if self.stage not in (1, 2):
            raise ConfigError(f"stage must be 1 or 2, got {self.stage}.")
        if self.stage == 2 and self.data.prompt:
            raise ConfigError(f"data.prompt={self.data.prompt!r} in stage 2 would become part of every caption the "
                              f"LLM is trained to write (with a loss); an LLM prompt goes in language.prompt, which "
                              f"gets none (BLIP-2's stage-2 prompt is the model's, not the text processor's).")
        for name in ("max_steps", "save_every", "keep_last", "log_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.optim.warmup_steps >= self.max_steps:
            raise ConfigError(f"optim.warmup_steps={self.optim.warmup_steps} must be smaller than "
                              f"max_steps={self.max_steps} (the schedule warms up, then decays to optim.min_lr).")
        if self.pretrained.max_text_len > self.model.max_position_embeddings:
            raise ConfigError(
                f"pretrained.max_text_len={self.pretrained.max_text_len} exceeds "
                f"model.max_position_embeddings={self.model.max_position_embeddings}."
            )


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str, source: str) -> Any:
    """Convert a YAML / override value to the annotated type, or raise naming the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{source}: {where}: cannot be {value!r}")
    if _is_dataclass_type(tp):
        if value is None:  # a section whose keys are all commented out: its defaults
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where} must be a mapping of fields, got {value!r}.")
        return from_dict(tp, value, prefix=f"{where}.", source=source)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {where} must be a list, got {value!r}.")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:  # a fixed-length tuple, e.g. (beta1, beta2)
            if len(value) != len(args):
                raise ConfigError(f"{source}: {where} must have {len(args)} values, got {len(value)}: {value!r}.")
            return tuple(_coerce(v, t, f"{where}[{i}]", source) for i, (v, t) in enumerate(zip(value, args)))
        (item_tp, *_) = args or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]", source) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {where} must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {where} must be an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {where} must be a number, got {value!r}.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: {where} must be a string, got {value!r}.")
    raise ConfigError(f"{source}: {where}: unsupported field type {tp!r}.")


def _unknown_key_error(cls: type, unknown: list[str], prefix: str, source: str) -> ConfigError:
    known = [f.name for f in dataclasses.fields(cls)]
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"{prefix}{key}" + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
    return ConfigError(
        f"{source}: unknown key(s): {', '.join(hints)}. Known keys under "
        f"'{prefix.rstrip('.') or 'top level'}': {', '.join(known)}."
    )


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", source: str = "config") -> Any:
    """Build dataclass ``cls`` from a nested mapping; unknown keys are an error."""
    hints = _field_types(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise _unknown_key_error(cls, unknown, prefix, source)
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}", source) for name, value in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for YAML dumps, checkpoints and TensorBoard)."""
    return dataclasses.asdict(config)


class _YamlLoader(yaml.SafeLoader):
    """YAML with 1.2's plain scalars: only true/false are booleans (``compile: off``, ``prompt: yes`` stay
    strings) and dates stay strings (``output_dir: 2024-01-05``)."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(err).split())}).") from None


def _is_text(tp: Any) -> bool:
    """``str`` or ``str | None``: an override's text is the value itself, never parsed."""
    options = set(typing.get_args(tp)) if typing.get_origin(tp) in (typing.Union, types.UnionType) else {tp}
    return str in options and options <= {str, type(None)}


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type = Config) -> dict[str, Any]:
    """Apply ``dotted.key=value`` strings to a nested dict: the value is the text itself for a string field
    (``language.prompt=Question: {} Answer:``; ``null`` for none where that is allowed), a YAML scalar or
    list otherwise."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.num_layers=6).")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node, node_cls = data, cls
        for depth, key in enumerate(keys):
            hints = _field_types(node_cls)
            if key not in hints:
                raise _unknown_key_error(node_cls, [key], ".".join(keys[:depth]) + ("." if depth else ""),
                                         f"override {item!r}")
            if depth == len(keys) - 1:
                if _is_text(hints[key]):
                    none = type(None) in typing.get_args(hints[key]) and raw.strip() in ("", "null", "None", "~")
                    node[key] = None if none else raw
                else:
                    node[key] = _parse_yaml(raw, f"override {item!r}") if raw.strip() else None
            else:
                if not _is_dataclass_type(hints[key]):
                    raise ConfigError(f"override {item!r}: {'.'.join(keys[:depth + 1])} is not a section.")
                if node.get(key) is None:  # absent, or a section whose keys are all commented out
                    node[key] = {}
                node = node[key]
                node_cls = hints[key]
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type = Config) -> Any:
    """Load a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist.")
        source = str(path)
        loaded = _parse_yaml(path.read_text(), str(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}.")
        data = loaded or {}
    data = apply_overrides(data, overrides or [], cls)
    config = from_dict(cls, data, source=source)
    if hasattr(config, "validate"):
        config.validate()
    return config
