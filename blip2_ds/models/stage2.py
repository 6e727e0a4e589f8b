"""Stage 2: vision-to-language generative learning with a frozen LLM (OPT or FlanT5).

The Q-Former (without its text parts) turns the frozen image features into 32 query outputs;
``llm_proj`` maps them into the LLM's input-embedding space, where they act as a soft prompt:

- OPT (decoder-only): ``[soft prompt; </s> prompt caption "\\n"]`` -> next-token loss on the
  caption and its "\\n" end marker (not on the soft prompt, the text prompt or pad). As in the
  original, the ``</s>`` after the soft prompt is masked together with a text prompt, and scored
  when there is none;
- T5 (encoder-decoder), the paper's prefix-LM: each caption is split at a random word boundary;
  encoder ``[soft prompt; prompt prefix </s>]``, decoder target the suffix. The split is drawn
  from ``sample_seed`` (pass the step for a reproducible, resumable run).

Only the Q-Former, ``query_tokens``, ``ln_vision`` and ``llm_proj`` are parameters of this
module. The frozen LLM is held as a plain attribute, not a submodule: it is in no
``parameters()``, ``state_dict()`` or optimizer, and a checkpoint of this module is the
trainable part only (~107M parameters for ViT-g + OPT-2.7B, instead of ~2.8B).
``to()`` moves the LLM along (device only: it keeps its own dtype).
"""
from __future__ import annotations

import random
import re
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from blip2_ds.config import ConfigError, GenerationConfig, LanguageConfig, QFormerConfig
from blip2_ds.convert import FORMATS, OURS, convert
from blip2_ds.models.language import FrozenLanguageModel
from blip2_ds.models.length_groups import LengthGroups, plan_length_groups
from blip2_ds.models.qformer import QFormer, init_weights
from blip2_ds.models.stage1 import Stage1Model
from blip2_ds.objectives import loss_range

IGNORE = -100
"""Label of positions without loss (``F.cross_entropy``'s default ``ignore_index``)."""


@dataclass
class TextBatch:
    """Tokenized text of one batch (what :class:`LLMTextTokenizer` returns; the training stream builds
    it in its DataLoader workers, and ``forward`` takes it instead of strings).

    OPT: ``input_ids`` / ``attention_mask`` are the full text ``</s> prompt caption "\\n"``
    (right-padded) and ``labels`` are the same ids with -100 where there is no loss.
    T5: ``input_ids`` / ``attention_mask`` are the encoder text after the soft prompt (the
    prompt + ``</s>``), ``labels`` the decoder target (caption + ``</s>``, pad = -100).
    The rows are in the captions' order, padded to the longest; ``groups`` says how the LLM is
    to run them in groups of similar length (None: as one padded batch).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    groups: LengthGroups | None = None
    """Length groups planned by the tokenizer (``language.length_groups``), see :mod:`blip2_ds.models.length_groups`."""

    def to(self, device: torch.device | str) -> "TextBatch":
        """Copies on ``device``; to a GPU without blocking the host (the stream pins the batch)."""
        asynchronous = torch.device(device).type == "cuda"  # never device -> host: it would be read too early
        return TextBatch(*(t.to(device, non_blocking=asynchronous)
                           for t in (self.input_ids, self.attention_mask, self.labels)),
                         None if self.groups is None else self.groups.to(device, non_blocking=asynchronous))

    def pin_memory(self) -> "TextBatch":
        """Page-locked copies (the DataLoader calls this with ``pin_memory=True``)."""
        return TextBatch(self.input_ids.pin_memory(), self.attention_mask.pin_memory(), self.labels.pin_memory(),
                         None if self.groups is None else self.groups.pin_memory())

    def group_shapes(self) -> list[tuple[int, int, int]]:
        """``(rows, input width, label width)`` of each group the LLM runs (without ``groups``: the batch)."""
        if self.groups is None:
            return [(self.input_ids.shape[0], self.input_ids.shape[1], self.labels.shape[1])]
        return list(zip(self.groups.sizes, self.groups.input_widths, self.groups.label_widths))

    def llm_positions(self, soft_tokens: int, decoder: bool) -> int:
        """Positions the frozen LLM computes for this batch in its groups: each row's soft prompt and its
        group's input width, plus (``decoder``: T5) its group's label width."""
        return sum(rows * (soft_tokens + width + (label_width if decoder else 0))
                   for rows, width, label_width in self.group_shapes())

    def grouped(self) -> list[tuple[slice, "TextBatch"]]:
        """The rows group by group: ``(rows, text)`` with ``rows`` a slice of the batch reordered by
        ``groups.order`` and ``text`` those rows cut to the group's own widths (padding is on the right,
        so only pad columns go). Without ``groups``: the whole batch as it is."""
        if self.groups is None:
            return [(slice(None), self)]
        order = self.groups.order
        ids, mask, labels = (t.index_select(0, order) for t in (self.input_ids, self.attention_mask, self.labels))
        return [(slice(start, stop), TextBatch(ids[start:stop, :width], mask[start:stop, :width],
                                               labels[start:stop, :label_width]))
                for start, stop, width, label_width in self.groups.spans()]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])


class LLMTextTokenizer:
    """Captions -> :class:`TextBatch` in stage 2's format, truncated to ``language.max_text_len`` tokens,
    with its length groups planned (``language.length_groups``).

    Holds only the LLM's tokenizer and its :class:`LanguageConfig`, not the model: the training
    stream's DataLoader workers run it next to the image decoding, so a training step does not
    tokenize (the original tokenizes in every step's forward, on the trainer's critical path).
    T5: ``rng`` draws each caption's prefix-LM split (None = no split: the whole caption is the
    target, as for evaluation).
    """

    def __init__(self, tokenizer, cfg: LanguageConfig):
        self.tokenizer, self.cfg = tokenizer, cfg

    def prompt_ids(self, prompt: str) -> list[int]:
        """OPT: ``</s>`` + prompt tokens. Tokenized apart from the caption, so their count is exact."""
        return [self.tokenizer.bos_token_id] + self.tokenizer(prompt.rstrip(), add_special_tokens=False).input_ids

    def __call__(self, captions: list[str], rng: random.Random | None = None) -> TextBatch:
        tokenizer, cfg = self.tokenizer, self.cfg
        if cfg.kind == "opt":
            head = self.prompt_ids(cfg.prompt)
            sep = " " if cfg.prompt.strip() else ""
            room = cfg.max_text_len - len(head)
            if room < 1:
                raise ConfigError(f"language.prompt={cfg.prompt!r} takes {len(head)} tokens with the bos: "
                                  f"language.max_text_len={cfg.max_text_len} leaves no room for the caption.")
            bodies = tokenizer([sep + c + "\n" for c in captions], add_special_tokens=False).input_ids
            rows = [head + body[:room] for body in bodies]
            ids = _pad(rows, tokenizer.pad_token_id)
            mask = _pad([[1] * len(r) for r in rows], 0)
            labels = ids.masked_fill(mask == 0, IGNORE)
            if cfg.prompt:
                labels[:, : len(head)] = IGNORE
            lengths = [len(r) for r in rows]
            return TextBatch(ids, mask, labels, plan_length_groups(lengths, lengths, cfg.length_groups))
        prefixes, suffixes = [], []
        for caption in captions:
            words = caption.split()
            cut = rng.randrange(len(words)) if rng is not None and len(words) > 1 else 0
            prefixes.append(" ".join(([cfg.prompt] if cfg.prompt else []) + words[:cut]))
            suffixes.append(" ".join(words[cut:]))
        prefix = tokenizer(prefixes, padding="longest", truncation=True, max_length=cfg.max_text_len,
                           return_tensors="pt")
        target = tokenizer(suffixes, padding="longest", truncation=True, max_length=cfg.max_text_len,
                           return_tensors="pt")
        labels = target.input_ids.masked_fill(target.attention_mask == 0, IGNORE)
        groups = plan_length_groups(prefix.attention_mask.sum(1).tolist(), target.attention_mask.sum(1).tolist(),
                                    cfg.length_groups)
        return TextBatch(prefix.input_ids, prefix.attention_mask, labels, groups)


class Stage2Model(nn.Module):
    """``ln_vision`` + Q-Former (queries only) + ``llm_proj`` in front of a frozen LLM.

    ``kernels`` (auto / triton / torch) picks the cross-attention path (:mod:`blip2_ds.kernels`).
    ``llm=None`` builds the trainable part alone (give ``llm_hidden``): enough to count
    parameters, build it on the meta device, or load / convert checkpoints without an LLM.
    """

    def __init__(self, qformer_cfg: QFormerConfig, llm: FrozenLanguageModel | None = None,
                 llm_hidden: int | None = None, kernels: str = "auto"):
        super().__init__()
        if llm is None and llm_hidden is None:
            raise ValueError("Stage2Model needs the frozen LLM or, without it, llm_hidden (its embedding width).")
        if llm is not None and llm_hidden not in (None, llm.hidden_size):
            raise ValueError(f"llm_hidden={llm_hidden} but the LLM's embeddings are {llm.hidden_size} wide.")
        self.cfg = qformer_cfg
        self.query_tokens = nn.Parameter(torch.zeros(1, qformer_cfg.num_query_tokens, qformer_cfg.hidden_size))
        self.ln_vision = nn.LayerNorm(qformer_cfg.vision_width, eps=qformer_cfg.vision_norm_eps)
        self.kernels = kernels
        """auto / triton / torch: the cross-attention path (:mod:`blip2_ds.kernels`)."""
        self.qformer = QFormer(qformer_cfg, with_text=False, kernels=kernels)
        self.llm_proj = nn.Linear(qformer_cfg.hidden_size, llm_hidden or llm.hidden_size)
        # Not a submodule on purpose (see the module docstring).
        object.__setattr__(self, "llm", llm)
        self._forward_calls = 0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT init for the Q-Former and queries; ``llm_proj`` keeps PyTorch's Linear init (as LAVIS)."""
        init_weights(self.qformer, self.cfg.init_std)
        nn.init.normal_(self.query_tokens, std=self.cfg.init_std)
        self.ln_vision.reset_parameters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer gets: every parameter of this module (the LLM is not one of them)."""
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def to(self, *args, **kwargs) -> "Stage2Model":
        """Move the trainable part as asked and the frozen LLM to the same device (not dtype)."""
        super().to(*args, **kwargs)
        if self.llm is not None:
            self.llm.model.to(self.query_tokens.device)
        return self

    def _require_llm(self) -> FrozenLanguageModel:
        if self.llm is None:
            raise RuntimeError("this Stage2Model was built without its LLM (llm=None); it cannot compute text.")
        return self.llm

    # ---- image side ---------------------------------------------------------------------------
    vision_states = Stage1Model.vision_states  # the same fp32 ln_vision (uses self.cfg, self.ln_vision)

    def soft_prompt(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Frozen-ViT output (B, N, vision_width) -> soft prompt (B, Q, LLM hidden) in the LLM's dtype."""
        image_kv = self.qformer.image_kv(self.vision_states(image_embeds))
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        hidden, _ = self.qformer(query_embeds=queries, image_kv=image_kv)
        projected = self.llm_proj(hidden)
        return projected if self.llm is None else projected.to(self.llm.dtype)

    # ---- text side ----------------------------------------------------------------------------
    def text_tokenizer(self) -> "LLMTextTokenizer":
        """What turns captions into this model's :class:`TextBatch` (the data workers run it)."""
        llm = self._require_llm()
        return LLMTextTokenizer(llm.tokenizer, llm.cfg)

    def tokenize(self, captions: list[str], rng: random.Random | None = None) -> TextBatch:
        """Captions -> :class:`TextBatch` (see :class:`LLMTextTokenizer`)."""
        return self.text_tokenizer()(captions, rng)

    # ---- training -----------------------------------------------------------------------------
    def forward(self, image_embeds: torch.Tensor, captions: list[str] | TextBatch,
                sample_seed: int | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy (fp32) of the captions given the images.

        ``sample_seed`` draws T5's prefix-LM splits (default: a per-call counter).
        """
        self._require_llm()
        if sample_seed is None:
            sample_seed = self._forward_calls
        self._forward_calls += 1
        text = captions if isinstance(captions, TextBatch) else self.tokenize(captions, random.Random(sample_seed))
        text = text.to(image_embeds.device)
        soft = self.soft_prompt(image_embeds)
        # Length groups: the same positions and targets, fewer pad positions; the sum over the groups
        # divided by the batch's target count is the one padded batch's token mean.
        if text.groups is not None:
            soft = soft.index_select(0, text.groups.order)
        total = soft.new_zeros((), dtype=torch.float32)
        for rows, group in text.grouped():
            logits = self._llm_logits(soft[rows], group)
            with loss_range("lm"):
                total = total + F.cross_entropy(logits.float().flatten(0, 1), group.labels.flatten(),
                                                ignore_index=IGNORE, reduction="sum")
        return total / text.labels.ne(IGNORE).sum()

    def llm_pad_share(self, text: TextBatch) -> float:
        """The share of pad positions among those the frozen LLM computes for ``text`` in training (soft
        prompt included; T5: encoder and decoder), in its length groups: what ``language.length_groups``
        leaves to gain. Host arithmetic: call it on the batch before it goes to the device."""
        soft, decoder, rows = self.cfg.num_query_tokens, self._require_llm().kind != "opt", text.input_ids.shape[0]
        real = soft * rows + int(text.attention_mask.sum()) + (int(text.labels.ne(IGNORE).sum()) if decoder else 0)
        return 1.0 - real / text.llm_positions(soft, decoder)

    def _llm_logits(self, soft: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """The frozen LLM's logits at ``text.labels``' positions, (B, L, vocab), for soft prompts and text."""
        llm = self.llm
        ones = torch.ones(soft.shape[:2], dtype=text.attention_mask.dtype, device=soft.device)
        embeds = torch.cat([soft, llm.embed(text.input_ids)], dim=1)
        mask = torch.cat([ones, text.attention_mask], dim=1)
        if llm.kind == "opt":
            # Logits only where a text token is predicted: the last soft position and the text.
            length = text.input_ids.shape[1]
            return llm.model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=length + 1).logits[:, :-1]
        decoder_ids = llm.model.prepare_decoder_input_ids_from_labels(labels=text.labels)
        return llm.model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids).logits

    # ---- generation ---------------------------------------------------------------------------
    def _generation_inputs(self, soft: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        llm = self.llm
        if llm.kind == "opt":
            rows = [self.text_tokenizer().prompt_ids(p) for p in prompts]
            ids, mask = _pad(rows, llm.tokenizer.pad_token_id), _pad([[1] * len(r) for r in rows], 0)
        else:
            batch = llm.tokenizer(prompts, padding="longest", return_tensors="pt")
            ids, mask = batch.input_ids, batch.attention_mask
        ids, mask = ids.to(soft.device), mask.to(soft.device)
        embeds = torch.cat([soft, llm.embed(ids)], dim=1)
        mask = torch.cat([torch.ones(soft.shape[:2], dtype=mask.dtype, device=soft.device), mask], dim=1)
        if llm.kind == "opt":
            # A decoder-only model continues from the last position: move every pad to the front,
            # i.e. left padding (a stable sort on the mask keeps the order of the real positions).
            order = torch.sort(mask, dim=1, stable=True).indices
            embeds = embeds.gather(1, order[..., None].expand_as(embeds))
            mask = mask.gather(1, order)
        return embeds, mask

    @torch.no_grad()
    def generate_ids(self, image_embeds: torch.Tensor, prompt: str | list[str] | None = None,
                     gen: GenerationConfig | None = None) -> torch.Tensor:
        """Generated token ids, new tokens only: (B * num_captions, L), the texts of image i in rows
        ``i * num_captions`` onwards; a row that ends early has an end token, then the LLM's pad token."""
        llm = self._require_llm()
        gen = gen or GenerationConfig()
        batch = image_embeds.shape[0]
        prompt = llm.cfg.prompt if prompt is None else prompt
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch:
            raise ValueError(f"{len(prompts)} prompts for {batch} images.")
        embeds, mask = self._generation_inputs(self.soft_prompt(image_embeds), prompts)
        options = dict(max_new_tokens=gen.max_new_tokens, min_new_tokens=min(gen.min_new_tokens, gen.max_new_tokens),
                       repetition_penalty=gen.repetition_penalty, num_return_sequences=gen.num_captions,
                       eos_token_id=llm.end_token_ids, pad_token_id=llm.tokenizer.pad_token_id)
        if gen.use_nucleus_sampling:
            options.update(do_sample=True, top_p=gen.top_p, temperature=gen.temperature, num_beams=1)
        else:
            if gen.num_captions > gen.num_beams:
                raise ValueError(f"generation.num_captions={gen.num_captions} exceeds generation.num_beams="
                                 f"{gen.num_beams}: beam search returns at most num_beams texts per image.")
            options.update(do_sample=False, num_beams=gen.num_beams, length_penalty=gen.length_penalty)
        with warnings.catch_warnings():
            # Expected: the repetition penalty sees generated tokens only, not the soft prompt
            # or the text prompt (as in the original, which also generates from embeddings).
            warnings.filterwarnings("ignore", message=".*repetition_penalty.*inputs_embeds")
            out = llm.model.generate(inputs_embeds=embeds, attention_mask=mask, **options)
        if llm.kind == "t5":
            out = out[:, 1:]  # the decoder start token
        return out

    def generate(self, image_embeds: torch.Tensor, prompt: str | list[str] | None = None,
                 gen: GenerationConfig | None = None) -> list[str]:
        """Captions (or answers) for a batch of frozen-ViT features: ``B * gen.num_captions`` strings.

        ``prompt``: one text for every image, one per image (e.g. filled-in
        "Question: {} Answer:"), or None for ``language.prompt``. The prompt is not repeated
        in the output. Beam search by default; nucleus sampling with ``use_nucleus_sampling``.
        """
        ids = self.generate_ids(image_embeds, prompt, gen)
        return [text.strip() for text in self.llm.tokenizer.batch_decode(ids, skip_special_tokens=True)]


# ---- initialisation from checkpoints --------------------------------------------------------------
_TEXT_PARTS = re.compile(r"qformer\.(word_embeddings|position_embeddings|lm_head)\.|qformer\.layers\.\d+\.text_ffn\."
                         r"|(vision_proj|text_proj|itm_head)\.|temp\Z")
# The LLM projection under the names of LAVIS (OPT / T5 models) and HF.
_PROJECTIONS = ("opt_proj.", "t5_proj.", "language_projection.", "llm_proj.")


@dataclass
class Stage2InitReport:
    """What :func:`load_stage1_into_stage2` did."""

    loaded: list[str] = field(default_factory=list)
    """Stage-2 tensors (project naming) copied from the checkpoint."""
    dropped: list[str] = field(default_factory=list)
    """Checkpoint tensors not used: the stage-1 text parts and heads, frozen towers, LLM weights."""
    missing: list[str] = field(default_factory=list)
    """Stage-2 tensors the checkpoint did not provide (they keep their current values)."""

    def summary(self) -> str:
        text_parts = [n for n in self.dropped if _TEXT_PARTS.match(n)]
        return (f"stage-2 init: {len(self.loaded)} tensors loaded, {len(self.dropped)} dropped "
                f"({len(text_parts)} stage-1 text parts / heads), {len(self.missing)} missing"
                + (f": {', '.join(self.missing)}" if self.missing else ""))


def load_stage1_into_stage2(model: Stage2Model, state: dict[str, torch.Tensor], fmt: str = OURS) -> Stage2InitReport:
    """Initialise ``model`` in place from a stage-1 (or stage-2) checkpoint.

    ``fmt``: ``ours`` (a :class:`Stage1Model` or :class:`Stage2Model` state dict), ``lavis``
    (``blip2_pretrained.pth`` or a LAVIS stage-2 model) or ``hf`` (a ``Blip2*`` checkpoint).
    The LLM projection is taken too when present (``opt_proj`` / ``t5_proj`` /
    ``language_projection``). Raises ValueError on a shape mismatch or when no Q-Former tensor
    matches (a wrong ``fmt``).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not one of {', '.join(FORMATS)}.")
    report = Stage2InitReport()
    ours, rest = {}, {}
    for name, tensor in state.items():
        prefix = next((p for p in _PROJECTIONS if name.startswith(p)), None)
        if prefix is None:
            rest[name] = tensor
        else:
            ours["llm_proj." + name[len(prefix):]] = tensor
    if fmt == OURS:
        ours.update(rest)
    else:
        converted = convert(rest, fmt, OURS)
        ours.update(converted.state_dict)
        report.dropped.extend(converted.report.frozen + converted.report.unexpected)
    expected = model.state_dict()
    mismatched = [f"{n}: {tuple(t.shape)} in the checkpoint, {tuple(expected[n].shape)} in the model"
                  for n, t in ours.items() if n in expected and t.shape != expected[n].shape]
    if mismatched:
        raise ValueError("the checkpoint does not fit this stage-2 model: " + "; ".join(mismatched))
    usable = {n: t for n, t in ours.items() if n in expected}
    if not any(name.startswith("qformer.") for name in usable):
        raise ValueError(f"no Q-Former tensor in the checkpoint under fmt={fmt!r} naming (is the format right?).")
    model.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    report.dropped = sorted(report.dropped + [n for n in ours if n not in expected])
    report.missing = sorted(set(expected) - set(usable))
    return report
