"""Attention layers of the ACE-Step diffusion transformer and its rotary position embedding.

Self-attention over latent frames is ReLU *linear* attention (cost linear in the number of
frames); cross-attention to the condition tokens is ordinary softmax attention (SDPA).
Both take an optional per-batch-item factor on the query projection output: that is how
ERG-diffusion weakens the guidance branch inside one batched call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

LINEAR_ATTENTION_EPS = 1e-15


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for integer `positions` [..., L]: cos and sin [..., L, head_dim], float32.

    Frequencies are laid out half-split (`cat(freqs, freqs)`), exactly as the checkpoint was trained,
    even though `apply_rotary` rotates adjacent pairs.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / theta**exponents
    freqs = positions.float()[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [B, H, L, D] by tables broadcastable to it; computed in float32.

    Element pairs (2i, 2i+1) are rotated together: the rotated partner of
    [x0, x1, x2, x3, ...] is [-x1, x0, -x3, x2, ...].
    """
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    partner = torch.stack((-odd, even), dim=-1).flatten(-2)
    return (x.float() * cos + partner.float() * sin).to(x.dtype)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H*D] -> [B, H, L, D]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _project(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for x [B, L, C] as one [B*L, C] matrix product: under torch.compile with a dynamic
    batch, a 3-D input becomes a batched product against a broadcast weight, several times slower."""
    return layer(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def _scale_rows(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Multiply batch item b of `x` [B, ...] by `scale[b]`; identity when `scale` is None."""
    if scale is None:
        return x
    return x * scale.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


class LinearSelfAttention(nn.Module):
    """Multi-head ReLU linear attention over frames, with RoPE on queries and keys.

    out_t = sum_s v_s (k_s . q_t) / (sum_s k_s . q_t + eps), with q, k = ReLU(RoPE(.)); the
    products accumulate in float32 and the ratio is float32 whatever the compute dtype.
    Masked frames are zeroed in q, k and v, so they neither contribute nor receive anything.
    """

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        # opt-in fused kernel (linear_attention_kernel.fused_linear_attention), set by the gpu profile
        self.fused: Callable[..., torch.Tensor] | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        frame_mask: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        q_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, T, C], frame_mask [B, T] (1 valid, 0 padded), rotary cos/sin
        broadcastable to [B, H, T, D] (with `fused`: [1, 1, T, D]), q_scale [B] or None -> [B, T, C]."""
        dtype = hidden_states.dtype
        if self.fused is not None:
            out = self.fused(_scale_rows(_project(self.to_q, hidden_states), q_scale),
                             _project(self.to_k, hidden_states), _project(self.to_v, hidden_states),
                             frame_mask, rotary[0][0, 0], rotary[1][0, 0], self.heads)
            return _project(self.to_out[0], out)
        query = _split_heads(_scale_rows(_project(self.to_q, hidden_states), q_scale), self.heads)
        key = _split_heads(_project(self.to_k, hidden_states), self.heads)
        value = _split_heads(_project(self.to_v, hidden_states), self.heads)

        query = apply_rotary(query, *rotary)
        key = apply_rotary(key, *rotary)

        mask = frame_mask[:, None, :, None].to(dtype)
        query = F.relu(query * mask)
        key = F.relu(key * mask)
        value = value * mask

        # A row of ones appended to v^T makes one matmul give numerator and denominator. Both
        # products read q, k, v in the compute dtype (bf16 on the GPU: no float32 copies of the
        # whole q/k/v) and accumulate in float32 inside the GEMM; the ratio is taken in float32.
        # Zero rows pad D+1 up to a multiple of 8, so the [T, D+1] product keeps 16-byte aligned rows.
        head_dim = value.shape[-1]
        value_rows = F.pad(value.transpose(-1, -2), (0, 0, 0, 1), value=1.0)  # [B, H, D+1, T]
        value_rows = F.pad(value_rows, (0, 0, 0, -(head_dim + 1) % 8))  # [B, H, D+1+pad, T]
        summary = value_rows @ key  # [B, H, D+1+pad, D]
        summed = (query @ summary.transpose(-1, -2)).float()  # [B, H, T, D+1+pad]
        out = summed[..., :head_dim] / (summed[..., head_dim : head_dim + 1] + LINEAR_ATTENTION_EPS)  # [B, H, T, D]
        out = out.transpose(1, 2).flatten(2).to(dtype)  # [B, T, H*D]
        return _project(self.to_out[0], out)


# CrossAttention's projections that the published checkpoint holds and no forward applies.
UNAPPLIED_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class CrossAttention(nn.Module):
    """Multi-head softmax attention from frames to condition tokens (SDPA).

    Queries get frame-position RoPE, keys condition-position RoPE; masked condition tokens get
    no weight. `add_q_proj`, `add_k_proj`, `add_v_proj` and `to_add_out` exist only because the
    published checkpoint holds them: they are never applied.
    """

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.add_k_proj = nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        self.add_q_proj = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.to_add_out = nn.Linear(inner, dim)

    def drop_unapplied(self) -> None:
        """Delete `add_q_proj`, `add_k_proj`, `add_v_proj` and `to_add_out` after loading: 4 of this
        module's 8 projections, ~1.2 GiB in bf16 over the full-size model's 24 blocks."""
        for name in UNAPPLIED_PROJECTIONS:
            delattr(self, name)

    def keys_values(
        self, encoder_states: torch.Tensor, encoder_rotary: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (with condition-position RoPE) and values of encoder_states [B, S, C]: two [B, H, S, D].

        They depend only on the conditions, so a sampler can compute them once per request."""
        key = _split_heads(_project(self.to_k, encoder_states), self.heads)
        value = _split_heads(_project(self.to_v, encoder_states), self.heads)
        return apply_rotary(key, *encoder_rotary), value

    def forward(
        self,
        hidden_states: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        bias: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        q_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, T, C], key and value [B, H, S, D] from `keys_values`, bias [B, S]
        (0 for valid tokens, -inf for masked ones: an additive mask takes faster kernels than a
        boolean one), rotary cos/sin broadcastable to [B, H, T, D], q_scale [B] or None -> [B, T, C]."""
        query = _split_heads(_scale_rows(_project(self.to_q, hidden_states), q_scale), self.heads)
        query = apply_rotary(query, *rotary)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias[:, None, None, :].to(query.dtype))
        return _project(self.to_out[0], out.transpose(1, 2).flatten(2))


def additive_mask(encoder_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """encoder_mask [B, S] (1 valid) -> [B, S] in `dtype`: 0 where valid, -inf where masked."""
    return torch.zeros_like(encoder_mask, dtype=dtype).masked_fill(encoder_mask <= 0, float("-inf"))
