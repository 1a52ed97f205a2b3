"""The lyric Conformer of the ACE-Step transformer (`lyric_encoder.*` in the checkpoint).

A stack of pre-norm blocks, each relative-position multi-head self-attention (Transformer-XL
style, ESPnet sinusoidal table) then a SiLU feed-forward, on top of a Linear+LayerNorm input
projection. Parameter names follow the published checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-5


def relative_position_table(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal encodings of relative positions length-1, ..., 0, ..., -(length-1): [1, 2*length-1, dim].

    Even channels hold sin, odd channels cos (interleaved), as in ESPnet's `RelPositionalEncoding`.
    """
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / dim))
    relative = torch.arange(length - 1, -length, -1, dtype=torch.float32, device=device)
    angles = relative[:, None] * inv_freq
    table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)
    return table[None].to(dtype)


class LyricInputEmbedding(nn.Module):
    """Linear + LayerNorm, then scaled by sqrt(dim) for the sinusoidal relative positions."""

    def __init__(self, input_dim: int, dim: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(input_dim, dim), nn.LayerNorm(dim, eps=LAYER_NORM_EPS))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, input_dim] -> (x [B, L, dim], relative position table [1, 2L-1, dim])."""
        x = self.out(x) * math.sqrt(self.dim)
        return x, relative_position_table(x.shape[1], self.dim, x.device, x.dtype)


class RelPositionSelfAttention(nn.Module):
    """Self-attention with content (`pos_bias_u`) and position (`pos_bias_v`) biases.

    score(i, j) = ((q_i + u) . k_j + (q_i + v) . W_pos p(i - j)) / sqrt(d_head); padded keys get
    no weight, and a query with no valid key at all outputs zeros (then `linear_out`).
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"lyric encoder: output size {dim} is not divisible by {heads} attention heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.empty(heads, self.head_dim))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor, q_scale: float | torch.Tensor
    ) -> torch.Tensor:
        """x [B, L, C], key_mask [B, L] bool (True = valid), positions [1, 2L-1, C] -> [B, L, C].

        `q_scale` (a float, or [B] per row) multiplies the query projection output (ERG-lyric uses 0.01).
        """
        batch, length, _ = x.shape
        query = self.linear_q(x)
        if isinstance(q_scale, torch.Tensor):
            query = query * q_scale.to(query.dtype).reshape(-1, 1, 1)
        elif q_scale != 1.0:
            query = query * q_scale
        query = query.unflatten(-1, (self.heads, self.head_dim))  # [B, L, H, D]
        key = self.linear_k(x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        value = self.linear_v(x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        pos = self.linear_pos(positions).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

        content = (query + self.pos_bias_u).transpose(1, 2) @ key.transpose(-1, -2)  # [B, H, L, L]
        by_offset = (query + self.pos_bias_v).transpose(1, 2) @ pos.transpose(-1, -2)  # [B, H, L, 2L-1]
        # Column c of `by_offset` is relative position (L-1-c); pick i-j for entry (i, j).
        steps = torch.arange(length, device=x.device)
        offset_index = (steps[None, :] - steps[:, None] + length - 1).expand(batch, self.heads, length, length)
        position = by_offset.gather(-1, offset_index)

        scores = (content + position) / math.sqrt(self.head_dim)
        ignored = ~key_mask[:, None, None, :]
        weights = scores.masked_fill(ignored, -float("inf")).softmax(dim=-1).masked_fill(ignored, 0.0)
        out = (weights @ value).transpose(1, 2).flatten(2)
        return self.linear_out(out)


class FeedForward(nn.Module):
    """w_2(SiLU(w_1 x))."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden_dim)
        self.w_2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm residual block: relative-position self-attention, then feed-forward."""

    def __init__(self, dim: int, heads: int, ff_dim: int) -> None:
        super().__init__()
        self.self_attn = RelPositionSelfAttention(dim, heads)
        self.feed_forward = FeedForward(dim, ff_dim)
        self.norm_ff = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm_mha = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor, q_scale: float | torch.Tensor
    ) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), key_mask, positions, q_scale)
        return x + self.feed_forward(self.norm_ff(x))


class LyricConformerEncoder(nn.Module):
    """Lyric token embeddings [B, L, input_dim] -> contextual states [B, L, output_dim]."""

    def __init__(
        self, input_dim: int, output_dim: int, attention_heads: int, linear_units: int, num_blocks: int
    ) -> None:
        super().__init__()
        self.embed = LyricInputEmbedding(input_dim, output_dim)
        self.after_norm = nn.LayerNorm(output_dim, eps=LAYER_NORM_EPS)
        self.encoders = nn.ModuleList(
            ConformerLayer(output_dim, attention_heads, linear_units) for _ in range(num_blocks)
        )

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, layer_q_scales: Sequence[float | torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x [B, L, input_dim], mask [B, L] (nonzero = valid token) -> [B, L, output_dim].

        `layer_q_scales` gives one query factor per layer (None: all 1.0). Outputs at padded
        positions are not meaningful; valid positions do not depend on the padding.
        """
        if layer_q_scales is None:
            layer_q_scales = [1.0] * len(self.encoders)
        if len(layer_q_scales) != len(self.encoders):
            raise ValueError(f"layer_q_scales: expected {len(self.encoders)} values, got {len(layer_q_scales)}")
        key_mask = mask.to(torch.bool)
        x, positions = self.embed(x)
        for layer, q_scale in zip(self.encoders, layer_q_scales):
            x = layer(x, key_mask, positions, q_scale)
        return self.after_norm(x)
