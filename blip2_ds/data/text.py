"""Caption cleaning and tokenization, as the original BLIP-2 does it."""
from __future__ import annotations

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
