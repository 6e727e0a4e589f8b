"""Tiny OPT and T5 folders, laid out like real HF checkpoints, built offline for stage-2 tests.

Each folder holds a randomly initialised model (``save_pretrained``) and a tokenizer trained
here on a small caption corpus: a byte-level BPE for OPT (OPT's special tokens and ids:
``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, with ``</s>`` as bos and eos) and a
sentencepiece unigram model for T5 (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2). Tests load them
through ``build_language_model``, the path a real checkpoint takes.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

CORPUS = [
    "a dog running on the grass", "a cat sitting on a red sofa", "two people riding bikes down a street",
    "a photo of a small boat on the water", "a man holding an umbrella in the rain",
    "question: what is on the table? answer: a plate of food", "a woman with a tennis racket",
    "three birds flying over the sea", "a train stopped at a station", "an old clock tower in a city",
]
HIDDEN = 32


def _randomise(model: torch.nn.Module, std: float = 0.3) -> None:
    """Weights far from the near-uniform default init, so that argmax / sampling are decisive."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def make_opt_folder(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (1, 2)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, word_embed_proj_dim=HIDDEN, num_hidden_layers=2,
        ffn_dim=64, num_attention_heads=4, max_position_embeddings=64, dropout=0.1,
        pad_token_id=1, bos_token_id=2, eos_token_id=2))
    _randomise(model)
    model.save_pretrained(path)
    return path


def make_t5_folder(path: Path, feed_forward_proj: str = "relu") -> Path:
    import sentencepiece as spm
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    path.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 5), model_prefix=str(path / "spiece"), vocab_size=80, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    (path / "spiece.vocab").unlink()
    tokenizer = T5Tokenizer.from_pretrained(str(path), extra_ids=0, local_files_only=True)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=HIDDEN, d_ff=64, num_layers=2, num_heads=4, d_kv=8, dropout_rate=0.1,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False,
        feed_forward_proj=feed_forward_proj))
    _randomise(model)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llm_dirs(tmp_path_factory) -> dict[str, Path]:
    """``{"opt": folder, "t5": folder}``, built once per test session."""
    root = tmp_path_factory.mktemp("tiny_llms")
    return {"opt": make_opt_folder(root / "opt"), "t5": make_t5_folder(root / "t5")}
