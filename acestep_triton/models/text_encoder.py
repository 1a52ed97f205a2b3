"""The `text_encoder` component: UMT5 prompt encoder plus ACE-Step's ERG "null" variant.

ERG (its "tag" part, see acestep_triton.specs.ERG_Q_SCALE) makes the unconditional text states by
lowering the attention temperature of two middle encoder blocks: the output of
their query projection is multiplied by 0.01. Upstream does this with forward
hooks on the shared model; here a second module tree shares every weight with
the plain encoder and wraps those two query projections, so the plain encoder
is never touched and both variants can run (or be exported) independently.
`encode_rows` picks the scale per batch row (the `text_encoder` Triton model's
TEXT_Q_SCALE), so cond and ERG-null rows share one batch.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import UMT5EncoderModel

from acestep_triton.specs import ERG_Q_SCALE
from acestep_triton.text_tokenizer import TEXT_MAX_TOKENS, TextTokenizer

__all__ = ["ERG_TAG_BLOCKS", "TEXT_MAX_TOKENS", "TextEncoder", "erg_view"]
ERG_TAG_BLOCKS = (8, 9)


class ScaledOutput(nn.Module):
    """Runs `module` and multiplies its output by the `scale` buffer (the ERG query temperature).

    The buffer is a 0-d tensor; `encode_rows` swaps in a [B, 1, 1] one per call.
    """

    def __init__(self, module: nn.Module, scale: float, device: torch.device) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("scale", torch.tensor(scale, device=device), persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.module(hidden_states) * self.scale


def _missing_blocks_error(blocks: Sequence[int], num_blocks: int) -> ValueError:
    return ValueError(f"use_erg_tag: ERG scales UMT5 blocks {list(blocks)} but the encoder has {num_blocks} blocks")


def erg_view(model: UMT5EncoderModel, blocks: Sequence[int], scale: float) -> UMT5EncoderModel:
    """A copy of `model` that shares all its tensors and scales the q output of `blocks`."""
    num_blocks = len(model.encoder.block)
    if any(not 0 <= b < num_blocks for b in blocks):
        raise _missing_blocks_error(blocks, num_blocks)
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    view = copy.deepcopy(model, memo=shared)
    for b in blocks:
        attention = view.encoder.block[b].layer[0].SelfAttention
        attention.q = ScaledOutput(attention.q, scale, model.device)
    return view


def _scale_buffer_names(blocks: Sequence[int]) -> list[str]:
    return [f"encoder.block.{b}.layer.0.SelfAttention.q.scale" for b in blocks]


class TextEncoder:
    """Tokenizer + UMT5 encoder for prompts.

    `encode` returns `last_hidden_state` [B, L, d_model]; with `erg=True` it runs
    the ERG view (blocks `ERG_TAG_BLOCKS` with scaled queries) on the same weights.
    """

    def __init__(self, model: UMT5EncoderModel, tokenizer: TextTokenizer) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.num_blocks = len(model.encoder.block)
        has_erg_blocks = self.num_blocks > max(ERG_TAG_BLOCKS)
        self.erg_model = erg_view(model, ERG_TAG_BLOCKS, ERG_Q_SCALE) if has_erg_blocks else None

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> TextEncoder:
        """Load `umt5-base/` (config, weights and tokenizer.json) from a checkpoint folder."""
        model = UMT5EncoderModel.from_pretrained(str(path), dtype=dtype).to(device)
        return cls(model, TextTokenizer.from_pretrained(path))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both int64 [B, L], padded to the longest prompt."""
        return self.tokenizer.tokenize(prompts)

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, erg: bool = False) -> torch.Tensor:
        """[B, L] ids and mask -> last_hidden_state [B, L, d_model]; `erg` gives the ERG-null states."""
        if erg and self.erg_model is None:
            raise _missing_blocks_error(ERG_TAG_BLOCKS, self.num_blocks)
        model = self.erg_model if erg else self.model
        out = model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return out.last_hidden_state

    @torch.no_grad()
    def encode_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, q_scale: torch.Tensor) -> torch.Tensor:
        """Like `encode`, with the ERG query scale chosen per row: q_scale [B] or [B, 1]
        (1.0 plain row, ERG_Q_SCALE ERG-null row) -> last_hidden_state [B, L, d_model].

        Swaps the scale buffers for this call (torch.func.functional_call), so one
        instance must not run `encode_rows` from several threads at once.
        """
        if self.erg_model is None:
            raise _missing_blocks_error(ERG_TAG_BLOCKS, self.num_blocks)
        row_scale = q_scale.to(self.device, self.model.dtype).reshape(-1, 1, 1)
        if row_scale.shape[0] != input_ids.shape[0]:
            raise ValueError(f"q_scale: {row_scale.shape[0]} rows for {input_ids.shape[0]} prompts")
        scales = dict.fromkeys(_scale_buffer_names(ERG_TAG_BLOCKS), row_scale)
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        return torch.func.functional_call(self.erg_model, scales, args=(), kwargs=inputs).last_hidden_state
