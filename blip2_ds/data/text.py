"""Caption cleaning and tokenization, as the original BLIP-2 does it."""
from __future__ import annotations

import copy
import re

import torch

# The original's caption processor removes exactly these characters (commas and apostrophes stay).
_STRIPPED = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def clean_caption(caption: str, max_words: int = 50, prompt: str = "") -> str:
    """Lowercase, strip punctuation, collapse spaces, keep at most ``max_words`` words, prefix ``prompt``.

    Returns "" for a caption with no words left (the caller skips such samples).
    """
    caption = _SPACES.sub(" ", _STRIPPED.sub(" ", caption.lower())).strip()
    if not caption:
        return ""
    return prompt + " ".join(caption.split(" ")[:max_words])


def tokenize_batch(tokenizer, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) padded to exactly ``max_length`` (fixed shapes batch after batch), right-truncated."""
    encoded = tokenizer(captions, padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


class CaptionTokenizer:
    """``tokenize_batch`` at a fixed length, straight through the Rust backend of a fast tokenizer.

    The transformers wrapper re-configures padding and truncation on every call, which costs as much
    as the encoding itself on short captions; this keeps its own configured copy of the backend.
    Slow (pure Python) tokenizers fall back to :func:`tokenize_batch`. Same ids and masks either way.
    """

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.backend = None
        if getattr(tokenizer, "is_fast", False):
            self.backend = copy.deepcopy(tokenizer.backend_tokenizer)
            self.backend.enable_truncation(max_length)
            self.backend.enable_padding(length=max_length, pad_id=tokenizer.pad_token_id,
                                        pad_token=tokenizer.pad_token)

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.backend is None:
            return tokenize_batch(self.tokenizer, captions, self.max_length)
        encodings = self.backend.encode_batch(captions)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask

