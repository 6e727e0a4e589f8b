"""Everything the embedded demo trains on, built locally and deterministically from a seed.

    python -m blip2_ds.demo_assets [--root demo_assets] [--seed 0] [--force]

Nothing is downloaded. Under ``root/`` this writes:

- ``data/train/demo-*.tar``, ``data/val/demo-*.tar``: the synthetic shapes-and-colours set of
  :func:`blip2_ds.data.write.write_demo_dataset` (64 px images, captions such as
  "a small red circle above a large blue square");
- ``vision/tiny_vit.json`` + ``vision/tiny_vit.safetensors``: an open_clip model config of a small
  ViT (width 128, 5 blocks of which the tower keeps 4, patch 8, 64 px -> 65 tokens) and its
  random weights, saved once so that every run loads the same frozen tower through
  ``vision.model_config`` / ``vision.checkpoint``;
- ``tokenizer/``: a lowercase BERT WordPiece tokenizer whose vocabulary is built from the demo
  captions (HF format, ``[PAD]`` = 0), what ``pretrained.tokenizer_path`` points to; ``load_tokenizer`` adds ``[DEC]``;
- ``llm/``: a tiny OPT with a byte-level BPE tokenizer trained on the captions, briefly
  pre-trained as a causal LM on the train captions formatted as stage 2 feeds them
  (``</s>`` caption ``"\\n"``), packed several per sequence with repeats, so the frozen LLM
  already "speaks" the caption language and reads its context (see ``_packed_sequence``).

Creation is skipped when ``root/COMPLETE.json`` (written last) exists with the same parameters;
an interrupted creation has no marker and is redone from scratch. Concurrent callers (every rank
of a launch) serialise on ``.{root name}.lock`` beside ``root``. Equal parameters give equal files
on a given machine (shards byte-identical; models from ``torch.manual_seed``, computed with one
thread); about a minute on 2 CPU cores, most of it the LLM pre-training.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

MARKER = "COMPLETE.json"
FORMAT_VERSION = 2
IMAGE_SIZE = 64

# The frozen tower: an open_clip ViT. BLIP-2 drops the last block, so 5 layers -> 4 used blocks.
VISION_WIDTH = 128
VISION_CFG = {"image_size": IMAGE_SIZE, "layers": 5, "width": VISION_WIDTH, "head_width": 32, "patch_size": 8,
              "mlp_ratio": 4.0}
# open_clip configs always describe a text tower too; the project never builds it.
TEXT_CFG = {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
OPT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids: <s> 0, <pad> 1, </s> 2, <unk> 3
LLM_SHAPE = dict(hidden_size=128, word_embed_proj_dim=128, num_hidden_layers=2, ffn_dim=512,
                 num_attention_heads=4, max_position_embeddings=64)


@dataclass(frozen=True)
class DemoAssets:
    """Paths of the demo assets (see the module docstring) and what their creation reported."""

    root: Path
    train_pattern: str
    """Brace pattern of the train shards (``data.train``)."""
    val_pattern: str
    """Brace pattern of the held-out shards."""
    vision_config: Path
    """open_clip model-config JSON of the tiny ViT (``vision.model_config``)."""
    vision_checkpoint: Path
    """Its weights (``vision.checkpoint``)."""
    tokenizer: Path
    """BERT WordPiece tokenizer folder (``pretrained.tokenizer_path``)."""
    llm: Path
    """Tiny OPT folder with its tokenizer (``language.path``)."""
    info: dict
    """The marker's content: parameters, sizes, LLM pre-training loss, creation time."""

    @property
    def vocab_size(self) -> int:
        """The Q-Former's ``model.vocab_size``: the WordPiece vocabulary + ``[DEC]``."""
        return int(self.info["qformer_vocab_size"])


def _paths(root: Path, info: dict) -> DemoAssets:
    # The shards' names from the marker, their folder from ``root``: a moved or copied asset folder (another
    # checkout, the GPU machine) still finds its own shards.
    train, val = (str(root / "data" / split / Path(info[f"{split}_pattern"]).name) for split in ("train", "val"))
    return DemoAssets(root=root, train_pattern=train, val_pattern=val,
                      vision_config=root / "vision" / "tiny_vit.json",
                      vision_checkpoint=root / "vision" / "tiny_vit.safetensors",
                      tokenizer=root / "tokenizer", llm=root / "llm", info=info)


def ensure_demo_assets(root: str | Path = "demo_assets", seed: int = 0, force: bool = False, *,
                       num_train: int = 4000, num_val: int = 200, samples_per_shard: int = 250,
                       llm_steps: int = 1000, llm_batch: int = 32, log=None) -> DemoAssets:
    """Create the demo assets under ``root`` unless a complete set with these parameters is there.

    ``log``: a ``print``-like callable for progress lines (default: silent).
    """
    root = Path(root)
    log = log or (lambda *a, **k: None)
    params = {"format": FORMAT_VERSION, "seed": seed, "num_train": num_train, "num_val": num_val,
              "samples_per_shard": samples_per_shard, "llm_steps": llm_steps, "llm_batch": llm_batch}
    # Several processes (e.g. every rank of a launch) may call this at once: one builds, the
    # others wait on the lock and then find the marker.
    root.parent.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        _lock(lock)
        # One thread: the same float arithmetic whatever the core count (so the same LLM
        # weights), and no slowdown from oversubscribed cores when other processes run.
        torch.set_num_threads(1)
        try:
            return _ensure(root, params, force, log)
        finally:
            torch.set_num_threads(threads)


def _lock(handle) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock; single-process use is still fine
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released when the file is closed


def _ensure(root: Path, params: dict, force: bool, log) -> DemoAssets:
    seed, num_train, num_val = params["seed"], params["num_train"], params["num_val"]
    samples_per_shard, llm_steps, llm_batch = params["samples_per_shard"], params["llm_steps"], params["llm_batch"]
    marker = root / MARKER
    if marker.is_file() and not force:
        try:
            info = json.loads(marker.read_text())
        except json.JSONDecodeError:
            info = {}
        if info.get("params") == params:
            return _paths(root, info)
        log(f"demo assets in {root} were made with other parameters; rebuilding")
    start = time.perf_counter()
    marker.unlink(missing_ok=True)
    for part in ("data", "vision", "tokenizer", "llm"):
        shutil.rmtree(root / part, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    timings = {}

    t = time.perf_counter()
    from blip2_ds.data.write import write_demo_dataset

    data = write_demo_dataset(root / "data", num_train, num_val, seed, IMAGE_SIZE, samples_per_shard)
    timings["data_s"] = time.perf_counter() - t
    log(f"data: {data['train'].describe()}\n      val {data['val'].describe()} ({timings['data_s']:.1f}s)")
    captions = read_captions(data["train"].shards)

    t = time.perf_counter()
    _make_vision(root / "vision", seed)
    timings["vision_s"] = time.perf_counter() - t

    t = time.perf_counter()
    bert_vocab = _make_bert_tokenizer(root / "tokenizer", captions)
    timings["tokenizer_s"] = time.perf_counter() - t
    log(f"tokenizer: {bert_vocab} WordPiece tokens (+[DEC] = {bert_vocab + 1}) ({timings['tokenizer_s']:.1f}s)")

    t = time.perf_counter()
    llm_info = _make_llm(root / "llm", captions, seed, llm_steps, llm_batch, log)
    timings["llm_s"] = time.perf_counter() - t

    timings["total_s"] = time.perf_counter() - start
    info = {"params": params, "train_pattern": data["train"].pattern, "val_pattern": data["val"].pattern,
            "train_shards": len(data["train"].shards), "val_shards": len(data["val"].shards),
            "qformer_vocab_size": bert_vocab + 1, "vision_width": VISION_WIDTH,
            "vision_tokens": 1 + (IMAGE_SIZE // VISION_CFG["patch_size"]) ** 2, "llm": llm_info,
            "timings": {k: round(v, 2) for k, v in timings.items()}}
    tmp = marker.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    tmp.replace(marker)  # last: only now are the assets complete
    log(f"demo assets ready in {root} ({timings['total_s']:.1f}s)")
    return _paths(root, info)


def read_captions(shards) -> list[str]:
    """The ``.txt`` members of the given tar shards, in order."""
    captions = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    captions.append(tar.extractfile(member).read().decode("utf-8"))
    return captions


# ---- vision ----------------------------------------------------------------------------------------
def write_tiny_vision_config(path: Path) -> Path:
    """The demo tower's open_clip model config (``vision.model_config``), written to ``path``."""
    path.write_text(json.dumps({"embed_dim": 64, "vision_cfg": VISION_CFG, "text_cfg": TEXT_CFG},
                               indent=2, sort_keys=True) + "\n")
    return path


def _make_vision(out: Path, seed: int) -> None:
    from safetensors.torch import save_file

    from blip2_ds.config import VisionConfig
    from blip2_ds.models.vision import build_vision_tower

    out.mkdir(parents=True, exist_ok=True)
    config = write_tiny_vision_config(out / "tiny_vit.json")
    torch.manual_seed(seed)
    tower = build_vision_tower(VisionConfig(model_name="tiny_vit", model_config=str(config), checkpoint=None,
                                            image_size=IMAGE_SIZE, dtype="fp32"))
    # open_clip initialises the class embedding, positional embedding and projections with
    # random normals but leaves LayerNorms at (1, 0); that is a fine random tower as is.
    state = {k: v.contiguous() for k, v in tower.encoder.state_dict().items()}
    save_file(state, str(out / "tiny_vit.safetensors"), metadata={"format": "pt"})


# ---- Q-Former tokenizer -------------------------------------------------------------------------------
def _make_bert_tokenizer(out: Path, captions: list[str]) -> int:
    """A WordPiece vocabulary of the captions: specials, characters, ``##``characters, whole words.

    The words come from BERT's own normaliser and pre-tokenizer (``tokenizers``), so the
    tokenizer splits text exactly as it was counted. Built directly rather than with the
    WordPiece trainer, whose ties make the file differ from run to run: the demo grammar is
    word-level anyway, so every caption word is one token and the characters cover the rest.
    """
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True,
                                            lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    # Every word of the demo grammar, whatever the sample drew, so the size is fixed (101 with [DEC]).
    words = sorted({word for text in [" ".join(grammar_words()), *captions]
                    for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))})
    return write_wordpiece_tokenizer(out, wordpiece_vocab(words))


def grammar_words() -> list[str]:
    """The words of the demo's caption grammar (``data.write``), each once."""
    from blip2_ds.data import write

    phrases = ["a on background", *write.COLOURS, *write.NEUTRALS, *write.SHAPES, *write.SIZES, *write.RELATIONS]
    return list(dict.fromkeys(" ".join(phrases).split()))


def wordpiece_vocab(words: list[str]) -> list[str]:
    """A word-level WordPiece vocabulary: the specials, every character alone and as ``##``suffix, the words."""
    chars = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    return list(dict.fromkeys(BERT_SPECIALS + chars + ["##" + c for c in chars] + words))


def write_wordpiece_tokenizer(out: Path, vocab: list[str]) -> int:
    """A lowercase BERT tokenizer of ``vocab`` saved in HF format in ``out``; returns its size (no ``[DEC]``)."""
    from transformers import BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("".join(token + "\n" for token in vocab), encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    if tokenizer.pad_token_id != 0:  # [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4
        raise RuntimeError(f"the WordPiece tokenizer in {out} has [PAD]={tokenizer.pad_token_id}, expected 0")
    tokenizer.save_pretrained(str(out))
    return len(tokenizer)


# ---- LLM ----------------------------------------------------------------------------------------------
def make_opt_tokenizer(captions: list[str]):
    """A byte-level BPE tokenizer in OPT's layout (``</s>`` = 2 first, ``<pad>`` = 1) trained on ``captions``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = sorted(set(captions))
    bpe.train_from_iterator([c + "\n" for c in corpus] + [" " + c for c in corpus], trainers.BpeTrainer(
        vocab_size=400, special_tokens=OPT_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (1, 2, 2)
    return tokenizer


def _make_llm(out: Path, captions: list[str], seed: int, steps: int, batch: int, log) -> dict:
    """Tiny OPT pre-trained as a causal LM on packed ``</s> caption "\n"`` segments (stage 2's text format)."""
    from transformers import OPTConfig, OPTForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_opt_tokenizer(captions)
    segments = [[tokenizer.bos_token_id] + ids for ids in
                tokenizer([c + "\n" for c in captions], add_special_tokens=False).input_ids]
    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), dropout=0.0, attention_dropout=0.0,
                                     pad_token_id=1, bos_token_id=2, eos_token_id=2, **LLM_SHAPE))
    info = {"vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters()),
            "steps": steps, "batch_size": batch}
    if steps > 0:
        info.update(_pretrain(model, segments, tokenizer.pad_token_id, seed, steps, batch, log))
    model.eval()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return info


def _packed_sequence(rng: random.Random, segments: list[list[int]], length: int, repeat: float) -> list[int]:
    """Caption segments back to back, up to ``length`` tokens; each next one repeats the previous
    with probability ``repeat``.

    Why packed: stage 2 puts the caption after 8 soft-prompt positions, so the LLM must know
    positions beyond a lone caption's ~14 and must read what precedes ``</s>``. Why repeats: a
    real LLM uses its context; with independent captions only, this one would learn to ignore
    everything before ``</s>``, and a soft prompt could not steer it. With repeats it learns that
    the context may say what comes next, which is what the soft prompt says in stage 2.
    """
    row: list[int] = []
    previous = None
    while True:
        segment = previous if previous is not None and rng.random() < repeat else rng.choice(segments)
        if len(row) + len(segment) > length:
            return row
        row += segment
        previous = segment


def _pretrain(model, segments: list[list[int]], pad_id: int, seed: int, steps: int, batch: int, log,
              length: int = 48, repeat: float = 0.75) -> dict:
    rng = random.Random(f"blip2_ds-demo-llm/{seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:  # linear warmup, then cosine down to 5% of the peak
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.475 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    start, first, recent = time.perf_counter(), None, []
    for step in range(steps):
        rows = [_packed_sequence(rng, segments, length, repeat) for _ in range(batch)]
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        value = float(loss.detach())
        first = value if first is None else first
        recent = (recent + [value])[-20:]
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"llm pre-training step {step + 1}/{steps}: loss {sum(recent) / len(recent):.3f}")
    model.eval()
    with torch.no_grad():  # a lone caption, as stage 2 starts without image information
        lone = [model(input_ids=torch.tensor([s]), labels=torch.tensor([s])).loss.item() for s in segments[:64]]
    return {"lm_loss_first": round(first, 4), "lm_loss_final": round(sum(recent) / len(recent), 4),
            "lm_loss_lone_caption": round(sum(lone) / len(lone), 4),
            "pretrain_s": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip2_ds.demo_assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="demo_assets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = parser.parse_args(argv)
    assets = ensure_demo_assets(args.root, args.seed, args.force, log=print)
    print(json.dumps({k: str(v) for k, v in asdict(assets).items() if k != "info"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
