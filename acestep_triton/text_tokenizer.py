"""The UMT5 prompt tokenizer (umt5-base/tokenizer.json), as upstream calls it.

Separate from the encoder so the `preprocess` model tokenizes without loading UMT5 weights.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoTokenizer

TEXT_MAX_TOKENS = 256


class TextTokenizer:
    def __init__(self, tokenizer, max_length: int = TEXT_MAX_TOKENS) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> TextTokenizer:
        return cls(AutoTokenizer.from_pretrained(str(path)))

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, int64 [B, L], padded to the longest, truncated to 256."""
        batch = self.tokenizer(
            prompts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length
        )
        return batch["input_ids"], batch["attention_mask"]

    def tokenize_one(self, prompt: str) -> tuple[list[int], list[int]]:
        ids, mask = self.tokenize([prompt])
        return ids[0].tolist(), mask[0].tolist()
