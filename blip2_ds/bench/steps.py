"""One training step of each stage, timed phase by phase, for this project and for the original-style baseline.

Shapes: ``real`` = the paper's (EVA ViT-g/14 at 224 px, 257 tokens of 1408; BERT-base Q-Former with 32
queries; 32 text tokens; OPT-2.7B for stage 2), random weights; ``tiny`` = the demo's (a 4-block
ViT at 64 px, a 2-layer Q-Former of width 128, an OPT of width 128), for CPUs. Inputs are
synthetic: uint8 crops slightly larger than the input size (so the device resize runs, as in
training) and random captions of random length.

Per configuration (``project`` / ``baseline``, stage 1 / 2) :func:`measure` reports samples/s,
TFLOP/s from the analytic count of :mod:`blip2_ds.train.metrics` (the project step's executed
FLOPs, frozen forwards included, used for BOTH steps so that they compare useful work), MFU
against a bf16 matmul rate measured in the same run, peak memory, and the share of each phase:
input (host->device + resize/normalise), ViT forward, forward (Q-Former, losses; LLM for stage 2) and
the losses' share of it (similarities, negative draw, cross-entropies), backward (with ZeRO-2's
gradient reduction), optimizer. Phases are timed in separate steps with a
device sync after each; samples/s comes from the median of whole steps (one sync per step), the
project's and the baseline's steps alternating (:func:`measure_interleaved`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from blip2_ds.config import LanguageConfig, ObjectiveConfig, OptimConfig, QFormerConfig, VisionConfig
from blip2_ds.train.garbage import FrozenSetup

ROOT_DIR = Path(__file__).resolve().parents[2]
PHASES = ("input", "vit", "forward", "losses", "backward", "optimizer", "comm")
"""Seconds per step of each phase; ``losses`` is the loss computations' share of ``forward`` and ``comm``
the collectives' share of all of them (neither is added to the others)."""
TEXT_LEN = 32
"""BLIP-2's max_txt_len for stage 1 (and the caption length of stage 2 here)."""
OPT_2_7B = dict(hidden_size=2560, word_embed_proj_dim=2560, num_hidden_layers=32, ffn_dim=10240,
                num_attention_heads=32, vocab_size=50272, max_position_embeddings=2048)


@dataclass
class Result:
    name: str
    """e.g. ``stage1 project``."""
    batch: int
    samples_per_s: float
    flops_per_sample: float | None
    peak_tflops: float
    peak_memory_gib: float | None
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds per step of each phase (synced)."""
    losses: dict[str, float] = field(default_factory=dict)

    @property
    def tflops(self) -> float | None:
        return None if self.flops_per_sample is None else self.samples_per_s * self.flops_per_sample / 1e12

    @property
    def mfu(self) -> float | None:
        return None if self.tflops is None else self.tflops / self.peak_tflops


# ---- models at real or tiny shapes ---------------------------------------------------------------
def vision_config(size: str, workdir: Path) -> VisionConfig:
    if size == "real":
        return VisionConfig("EVA01-g-14", None, None, 224, "bf16")
    from blip2_ds.demo_assets import write_tiny_vision_config

    return VisionConfig("tiny_vit", str(write_tiny_vision_config(workdir / "tiny_vit.json")), None,
                        _tiny_image_size(), "fp32")


def _tiny_image_size() -> int:
    from blip2_ds.demo_assets import IMAGE_SIZE

    return IMAGE_SIZE


def qformer_config(size: str) -> QFormerConfig:
    if size == "real":
        return QFormerConfig()
    from blip2_ds.config import load_config

    return load_config(ROOT_DIR / "configs" / "demo.yaml").model


def build_llm(size: str, device: torch.device, dtype: torch.dtype, captions: list[str] | None = None):
    """A random OPT (OPT-2.7B's shape, or the demo's) with a small BPE tokenizer trained here on ``captions``."""
    from transformers import OPTConfig, OPTForCausalLM

    from blip2_ds.demo_assets import LLM_SHAPE, make_opt_tokenizer
    from blip2_ds.models.language import FrozenLanguageModel

    tokenizer = make_opt_tokenizer(captions or [f"a photo of {n} things" for n in range(50)])
    shape = OPT_2_7B if size == "real" else {**LLM_SHAPE, "vocab_size": len(tokenizer)}
    with torch.device(device):
        model = OPTForCausalLM(OPTConfig(dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=2,
                                         eos_token_id=2, **shape)).to(dtype)
    return FrozenLanguageModel(model, tokenizer, LanguageConfig(kind="opt", path="(random weights)"))


# ---- synthetic inputs -----------------------------------------------------------------------------
def qformer_tokenizer(vocab_size: int, workdir: Path) -> tuple[object, list[str]]:
    """A word-level WordPiece tokenizer of exactly ``vocab_size`` tokens with ``[DEC]`` (the demo's 101, or
    bert-base-uncased's 30523), loaded as a user's is (``load_tokenizer``), and its whole words: the demo
    grammar's, then filler words up to the size."""
    from blip2_ds.demo_assets import grammar_words, wordpiece_vocab, write_wordpiece_tokenizer
    from blip2_ds.models.pretrained import load_tokenizer

    words = grammar_words()
    words += [f"w{i}" for i in range(vocab_size - 1 - len(wordpiece_vocab(words)))]
    write_wordpiece_tokenizer(workdir / "qformer_tokenizer", wordpiece_vocab(words))
    tokenizer = load_tokenizer(workdir / "qformer_tokenizer", TEXT_LEN)
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"the benchmark's tokenizer has {len(tokenizer)} tokens, the Q-Former {vocab_size}")
    return tokenizer, words


def synthetic_captions(batch: int, words: list[str], generator: torch.Generator) -> list[str]:
    """Captions of 6 to 31 random ``words``: 8 to 32 Q-Former tokens with [CLS] and [SEP]."""
    lengths = torch.randint(6, TEXT_LEN, (batch,), generator=generator).tolist()
    picks = torch.randint(0, len(words), (sum(lengths),), generator=generator).tolist()
    starts = [sum(lengths[:i]) for i in range(batch)]
    return [" ".join(words[j] for j in picks[start:start + n]) for start, n in zip(starts, lengths)]


def synthetic_batch(batch: int, image_size: int, captions: list[str], tokenizer, generator: torch.Generator) -> dict:
    """A batch as the training stream's workers hand it over: uint8 crops slightly larger than the input
    (so that the device resize runs), the captions, and their Q-Former tokens (``CaptionTokenizer``)."""
    from blip2_ds.data.text import CaptionTokenizer

    crop = int(image_size * 1.15)
    images = torch.randint(0, 256, (batch * crop * crop * 3,), dtype=torch.uint8, generator=generator)
    ids, mask = CaptionTokenizer(tokenizer, TEXT_LEN)(captions)
    if torch.cuda.is_available():
        images = images.pin_memory()
    return {"image": images, "image_shapes": torch.tensor([[crop, crop]] * batch),
            "flips": torch.zeros(batch, dtype=torch.bool), "jitter": None, "text_ids": ids, "text_mask": mask,
            "captions": captions}


# ---- the timed loop -------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepParts:
    """One training step as four callables (input -> vit -> forward -> backward+optimizer)."""

    inputs: Callable[[], tuple]
    vit: Callable[[torch.Tensor], torch.Tensor]
    forward: Callable[[torch.Tensor, tuple, int], dict]
    backward: Callable[[dict], None]
    optimizer: Callable[[], None]


def _one_step(parts: StepParts, index: int, device: torch.device, timings: dict[str, float] | None) -> dict:
    def timed(name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        if timings is not None:
            _sync(device)
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        return out

    pixels, *text = timed("input", parts.inputs)
    embeds = timed("vit", parts.vit, pixels)
    losses = timed("forward", parts.forward, embeds, tuple(text), index)
    timed("backward", parts.backward, losses)
    timed("optimizer", parts.optimizer)
    return losses


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def profiled_seconds(parts: StepParts, index: int, device: torch.device, repeats: int = 3) -> dict[str, float]:
    """Steps under torch's profiler: ``comm``, the time of their collectives (on CUDA the device time
    of the NCCL kernels, part of which may overlap compute; elsewhere the host time of the c10d
    operations, gloo blocks), covering the model's own gathers and ZeRO-2's gradient reduction alike;
    ``losses``, the time in the :data:`blip2_ds.objectives.LOSS_RANGE` ranges (device time on CUDA).
    Each the median over ``repeats`` steps: one step's range can hold a pause that is not its own (a
    garbage collection or a page-fault storm measured 8 ms inside a 0.4 ms range on a CPU)."""
    samples = [_profiled_step(parts, index + i, device) for i in range(repeats)]
    return {key: statistics.median(sample[key] for sample in samples) for key in samples[0]}


def _profiled_step(parts: StepParts, index: int, device: torch.device) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    from blip2_ds.objectives import LOSS_RANGE

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        _one_step(parts, index, device, None)
        _sync(device)
    events = prof.key_averages()

    def total_us(event) -> float:
        return getattr(event, "device_time_total", 0) if cuda else event.cpu_time_total

    if cuda:
        comm = sum(getattr(e, "self_device_time_total", 0) for e in events if "nccl" in e.key.lower())
    else:
        comm = sum(e.cpu_time_total for e in events if e.key.startswith("c10d::"))
    losses = sum(total_us(e) for e in events if e.key.startswith(LOSS_RANGE + "."))
    return {"comm": comm / 1e6, "losses": losses / 1e6}


def measure_interleaved(configs: dict[str, Callable[[], StepParts]], batch: int, device: torch.device, steps: int,
                        warmup: int, flops_per_sample: float | None, peak_tflops: float) -> list[Result]:
    """Time several step configurations of the same batch, alternating between them step by step.

    These machines are noisy: interleaving (and reversing the order every round) exposes every
    configuration to the same noise, and the median step time ignores the outliers. Each
    configuration's peak memory is that of its warm-up steps minus what the configurations built
    before it still hold (the shared frozen towers and inputs count for each).
    """
    shared = _allocated(device)
    built: dict[str, StepParts] = {}
    memory: dict[str, float | None] = {}
    for name, build in configs.items():
        others = _allocated(device) - shared
        built[name] = build()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(warmup):
            _one_step(built[name], i, device, None)
        _sync(device)
        memory[name] = (torch.cuda.max_memory_allocated(device) - others) / 1024 ** 3 if device.type == "cuda" else None
    with FrozenSetup():  # as the trainer runs its loop (train/garbage.py)
        results = _timed_rounds(built, memory, batch, device, steps, warmup, flops_per_sample, peak_tflops)
    built.clear()
    return results


def _timed_rounds(built: dict[str, StepParts], memory: dict[str, float | None], batch: int, device: torch.device,
                  steps: int, warmup: int, flops_per_sample: float | None, peak_tflops: float) -> list[Result]:
    names = list(built)
    times: dict[str, list[float]] = {n: [] for n in names}
    phases: dict[str, dict[str, float]] = {n: {} for n in names}
    losses: dict[str, dict] = {}
    phase_steps = max(1, steps // 2)
    for round_index in range(steps + phase_steps):
        for name in (names if round_index % 2 == 0 else names[::-1]):
            index = warmup + round_index
            if round_index < steps:
                start = time.perf_counter()
                losses[name] = _one_step(built[name], index, device, None)
                _sync(device)
                times[name].append(time.perf_counter() - start)
            else:
                _one_step(built[name], index, device, phases[name])
    for name in names:  # one more step each under the profiler: collectives and losses
        for phase, seconds in profiled_seconds(built[name], warmup + steps + phase_steps, device).items():
            phases[name][phase] = seconds * phase_steps
    results = []
    for name in names:
        median = sorted(times[name])[len(times[name]) // 2]
        results.append(Result(name, batch, batch / median, flops_per_sample, peak_tflops, memory[name],
                              {k: v / phase_steps for k, v in phases[name].items()},
                              {k: float(v.detach()) for k, v in losses[name].items()}))
    return results


# ---- the two steps of each stage ------------------------------------------------------------------
def _engine(model, precision: str, batch: int):
    from blip2_ds.train.engine import build_engine, fill_ds_config

    ds = fill_ds_config(json.loads((ROOT_DIR / "ds_configs" / "zero2.json").read_text()), micro_batch=batch,
                        grad_accum=1, world_size=_world_size(), grad_clip=1.0, precision=precision)
    return build_engine(model, ds, OptimConfig(), total_steps=10_000, precision=precision)


def _world_size() -> int:
    from blip2_ds import distributed

    return distributed.world_size()


class _LossOf(torch.nn.Module):
    """``loss_fn(model, *inputs)`` as a module's forward, so that DistributedDataParallel can wrap it."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., dict]):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *inputs) -> dict:
        return self.loss_fn(self.model, *inputs)


def _plain_step(model: torch.nn.Module, loss_fn: Callable[..., dict], autocast: bool, device: torch.device,
                clip: float | None, context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                ) -> tuple[Callable, Callable, Callable]:
    """(forward, backward, optimizer) of a step without DeepSpeed, as the original's runner trains:
    fp32 weights under autocast, torch's DistributedDataParallel over several ranks (bucketed
    gradient all-reduce during backward, buffers broadcast each forward), torch's AdamW with its
    defaults (for-each kernels on GPU), ``clip``: gradient-norm clipping (the original has none)."""
    from blip2_ds import distributed
    from blip2_ds.train.engine import param_groups

    model = model.train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.999))
    wrapped = _LossOf(model, loss_fn)
    if distributed.is_distributed():
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == "cuda" else None)

    def forward(embeds, text, index):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), context():
            return wrapped(embeds, text, index)

    def step():
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return forward, lambda losses: losses["loss"].backward(), step


@dataclass
class Bench:
    """The shared pieces of one stage's benchmark: tower, inputs, device, precision."""

    stage: int
    size: str
    batch: int
    device: torch.device
    precision: str
    kernels: str = "auto"
    activation_checkpointing: bool = False
    """For the project's steps only (the original had none)."""
    compile_vit: str = "off"
    """A torch.compile mode for the frozen tower (``VisionConfig.compile``): adds a ``compiled-vit`` row,
    the project's step with the compiled tower, to compare with the ``project`` row in the same run."""
    length_groups: int | None = None
    """Stage 2: ``language.length_groups`` of the project's rows (None: the config's default)."""
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="blip2_bench_")))
    reuse: "Bench | None" = None
    """Another Bench of the same stage and size whose frozen tower (and LLM) this one shares."""

    def __post_init__(self):
        from blip2_ds.data.transforms import DeviceTransform
        from blip2_ds.models.vision import build_vision_tower

        weakref.finalize(self, shutil.rmtree, str(self.workdir), True)  # the tokenizer and tower files it writes
        torch.manual_seed(0)
        self.vision_cfg = vision_config(self.size, self.workdir)
        if self.reuse is not None:
            self.tower = self.reuse.tower
            if hasattr(self.reuse, "llm"):
                self.llm = self.reuse.llm
        else:
            self.tower = build_vision_tower(self.vision_cfg).to(self.device)
        self.qcfg = qformer_config(self.size)
        self.transform = DeviceTransform(self.vision_cfg.image_size, dtype=self.tower.dtype)
        generator = torch.Generator().manual_seed(0)
        self.tokenizer, words = qformer_tokenizer(self.qcfg.vocab_size, self.workdir)
        self.captions = synthetic_captions(self.batch, words, generator)
        self.host_batch = synthetic_batch(self.batch, self.vision_cfg.image_size, self.captions, self.tokenizer,
                                          generator)
        self.autocast = self.device.type == "cuda" and self.precision != "fp32"

    def inputs(self):
        from blip2_ds.data.stream import batch_to_device

        return batch_to_device(self.host_batch, self.transform, self.device)

    def _original_inputs(self):
        """Pixels and the captions as strings: the original tokenizes in its forward, every step."""
        pixels, _, _ = self.inputs()
        return pixels, self.captions

    def vit(self, pixels):
        with torch.no_grad():
            return self.tower(pixels)

    def _compiled_vit(self, pixels):
        if not hasattr(self, "compiled_encoder"):
            from blip2_ds.models.vision import compiled_encoder

            self.compiled_encoder = compiled_encoder(self.tower, self.compile_vit)
        with torch.no_grad():
            return self.compiled_encoder(pixels)

    def stage1_compiled_vit(self) -> StepParts:
        return dataclasses.replace(self.stage1_project(), vit=self._compiled_vit)

    def stage2_compiled_vit(self) -> StepParts:
        return dataclasses.replace(self.stage2_project(), vit=self._compiled_vit)

    # ---- stage 1 ----
    def stage1_model(self):
        from blip2_ds.models.stage1 import Stage1Model

        torch.manual_seed(1)
        return Stage1Model(copy.deepcopy(self.qcfg), ObjectiveConfig(), kernels=self.kernels).to(self.device)

    def _ours(self, model):
        model.qformer.checkpoint_layers = self.activation_checkpointing
        return model

    def stage1_project(self) -> StepParts:
        engine = _engine(self._ours(self.stage1_model()), self.precision, self.batch)

        def forward(embeds, text, index):
            out = engine(embeds, *text, sample_seed=index)
            return {"loss": out.loss, "loss_itc": out.loss_itc, "loss_itm": out.loss_itm, "loss_itg": out.loss_itg}

        def optimizer():
            from blip2_ds.train.engine import constrain_parameters_

            engine.step()
            constrain_parameters_(engine)

        return StepParts(self.inputs, self.vit, forward, lambda losses: engine.backward(losses["loss"]), optimizer)

    def _without_engine(self, model, forward_loss) -> StepParts:
        """The project's model and losses, but fp32 weights under autocast and torch's AdamW with clipping
        instead of the DeepSpeed engine: separates what the step's structure buys from what the engine costs."""
        forward, backward, step = _plain_step(model, forward_loss, self.autocast, self.device, clip=1.0)
        return StepParts(self.inputs if self.stage == 1 else self._stage2_inputs, self.vit, forward, backward, step)

    def stage1_no_engine(self) -> StepParts:
        def loss(model, embeds, text, index):
            out = model(embeds, *text, sample_seed=index)
            return {"loss": out.loss, "loss_itc": out.loss_itc, "loss_itm": out.loss_itm, "loss_itg": out.loss_itg}

        return self._without_engine(self._ours(self.stage1_model()), loss)

    def stage2_no_engine(self) -> StepParts:
        return self._without_engine(self._ours(self.stage2_model()), lambda model, embeds, text, index: {
            "loss": model(embeds, text[0], sample_seed=index)})

    def stage1_baseline(self) -> StepParts:
        from blip2_ds.bench.original_step import eager_attention, original_stage1_loss, original_text_tokens

        generator = torch.Generator(device=self.device).manual_seed(0)

        def loss(model, embeds, text, index):
            ids, mask = original_text_tokens(self.tokenizer, text[0], TEXT_LEN, embeds.device)
            return original_stage1_loss(model, embeds, ids, mask, generator=generator)

        forward, backward, step = _plain_step(self.stage1_model(), loss, self.autocast, self.device, clip=None,
                                              context=eager_attention)
        return StepParts(self._original_inputs, self._eager_vit, forward, backward, step)

    def _eager_vit(self, pixels):
        """The frozen tower as the original ran it: attention written out, no fused kernel."""
        from blip2_ds.bench.original_step import eager_vision_attention

        with torch.no_grad(), eager_vision_attention(self.tower):
            return self.tower.encode(pixels)

    # ---- stage 2 ----
    def build_llm(self) -> None:
        """The frozen LLM and the captions, once (shared by both steps, so built before either is measured)."""
        from blip2_ds.models.stage2 import LLMTextTokenizer

        if not hasattr(self, "llm"):
            self.llm = build_llm(self.size, self.device, torch.bfloat16 if self.precision != "fp32" else torch.float32,
                                 self.captions)
        if not hasattr(self, "text2"):  # as the training stream's workers make it
            groups = self.llm.cfg.length_groups if self.length_groups is None else self.length_groups
            self.text2, self.text2_one_batch = (
                LLMTextTokenizer(self.llm.tokenizer, dataclasses.replace(self.llm.cfg, length_groups=n))(self.captions)
                for n in (groups, 1))

    def llm_positions(self) -> tuple[int, int]:
        """Positions the frozen LLM computes per step (soft prompt included): as one padded batch (the
        original) and in the project's length groups (``language.length_groups``)."""
        decoder = self.llm.kind != "opt"
        return tuple(text.llm_positions(self.qcfg.num_query_tokens, decoder)
                     for text in (self.text2_one_batch, self.text2))

    def stage2_model(self):
        from blip2_ds.models.stage2 import Stage2Model

        self.build_llm()
        torch.manual_seed(1)
        return Stage2Model(copy.deepcopy(self.qcfg), self.llm, kernels=self.kernels).to(self.device)

    def _stage2_inputs(self, one_batch: bool = False):
        pixels, _, _ = self.inputs()
        return pixels, (self.text2_one_batch if one_batch else self.text2).to(self.device)

    def stage2_project(self, one_batch_llm: bool = False) -> StepParts:
        engine = _engine(self._ours(self.stage2_model()), self.precision, self.batch)

        def forward(embeds, text, index):
            return {"loss": engine(embeds, text[0], sample_seed=index)}

        return StepParts(lambda: self._stage2_inputs(one_batch_llm), self.vit, forward,
                         lambda losses: engine.backward(losses["loss"]), engine.step)

    def stage2_one_batch_llm(self) -> StepParts:
        """The project's step with the frozen LLM on one padded batch (``language.length_groups=1``), as the
        original runs it: what the length groups buy, measured in the same run."""
        return self.stage2_project(one_batch_llm=True)

    def stage2_baseline(self) -> StepParts:
        from blip2_ds.bench.original_step import (eager_attention, eager_llm_attention, original_opt_text,
                                                  original_stage2_loss)

        model = self.stage2_model()

        @contextlib.contextmanager
        def eager():
            with eager_attention(), eager_llm_attention(model.llm.model):
                yield

        def loss(model, embeds, text, index):
            tokens = original_opt_text(model.llm.tokenizer, text[0], model.llm.cfg.max_text_len, embeds.device)
            return {"loss": original_stage2_loss(model, embeds, tokens)}

        forward, backward, step = _plain_step(model, loss, self.autocast, self.device, clip=None, context=eager)
        return StepParts(self._original_inputs, self._eager_vit, forward, backward, step)

    def flops_per_sample(self) -> float:
        from blip2_ds.train.metrics import LLMDims, VisionDims, stage1_step_flops, stage2_step_flops

        vision = VisionDims.from_tower(self.tower)
        predicting = float(self.host_batch["text_mask"].sum(1).float().mean() - 1)
        if self.stage == 1:
            return stage1_step_flops(self.qcfg, vision, TEXT_LEN, predicting_tokens=predicting)["total"]
        # the project's step as it runs: each length group's rows at that group's width
        llm = LLMDims.from_hf_config(self.llm.model.config)
        return sum(rows * stage2_step_flops(self.qcfg, vision, llm, width)["total"]
                   for rows, width, _ in self.text2.group_shapes()) / self.batch
