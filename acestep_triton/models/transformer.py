"""The ACE-Step v1 diffusion transformer (`ace_step_transformer/` of the published checkpoint).

`encode` turns the conditions (UMT5 text states, speaker embedding, lyric token ids) into one
token sequence; `decode` predicts the flow-matching velocity of the latents, attending to it.
The sampler calls `encode` once per request and `decode` once per step with every guidance
branch (cond / uncond / ERG) side by side in the batch.

ERG weakens a branch by multiplying query projections by a per-item factor
(acestep_triton.specs.ERG_Q_SCALE): Conformer layers `ERG_LYRIC_LAYERS` in `encode`, and self- and cross-attention of
blocks `ERG_DIFFUSION_BLOCKS` in `decode`, selected per batch item.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import RMSNorm
from torch import nn

from acestep_triton.models.attention import CrossAttention, LinearSelfAttention, additive_mask, rotary_cos_sin
from acestep_triton.models.lyric_encoder import LyricConformerEncoder

ERG_LYRIC_LAYERS = range(4, 6)
ERG_DIFFUSION_BLOCKS = range(15, 20)

TIMESTEP_CHANNELS = 256
PATCH_HIDDEN_PER_CHANNEL = 256
PATCH_NORM_GROUPS = 32
NORM_EPS = 1e-6

# The published tiny test checkpoint records its lyric Conformer sizes under this private config key.
TINY_LYRIC_ENCODER_KEY = "_tiny_lyric_encoder"


def _masked_group_norm(norm: nn.GroupNorm, x: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """GroupNorm of x [B, C, 1, T] with statistics over valid frames only (frame_mask [B, T]).

    With no padding this equals `norm(x)`; with padding, valid frames match an unpadded run.
    """
    batch, channels, height, frames = x.shape
    groups = norm.num_groups
    values = x.float().reshape(batch, groups, channels // groups * height, frames)
    weight = frame_mask.float()[:, None, None, :]
    count = (weight.sum(dim=-1, keepdim=True) * values.shape[2]).clamp_min(1.0)
    mean = (values * weight).sum(dim=(-2, -1), keepdim=True) / count
    centered = values - mean
    var = (centered * weight).square().sum(dim=(-2, -1), keepdim=True) / count
    normed = (centered * torch.rsqrt(var + norm.eps)).reshape(x.shape).to(x.dtype)
    return normed * norm.weight[:, None, None] + norm.bias[:, None, None]


class PatchEmbed(nn.Module):
    """Latents [B, C_lat, H, T] -> tokens [B, T, D]: one token per frame (patch = full height x 1)."""

    def __init__(self, in_channels: int, patch_size: Sequence[int], dim: int) -> None:
        super().__init__()
        hidden = in_channels * PATCH_HIDDEN_PER_CHANNEL
        self.early_conv_layers = nn.ModuleList(
            [
                nn.Conv2d(in_channels, hidden, kernel_size=tuple(patch_size), stride=tuple(patch_size)),
                nn.GroupNorm(PATCH_NORM_GROUPS, hidden, eps=NORM_EPS),
                nn.Conv2d(hidden, dim, kernel_size=1),
            ]
        )

    def forward(self, latents: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        patchify, norm, project = self.early_conv_layers
        x = project(_masked_group_norm(norm, patchify(latents), frame_mask))
        return x.flatten(2).transpose(1, 2)


class ConvLayer(nn.Module):
    """One Conv1d, kept under the name `conv` that the checkpoint uses."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel_size, padding=kernel_size // 2, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _depthwise_conv_frames(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise conv along T of x [B, T, C] (weight [C, k], k odd, 'same' zero padding, bias [C]),
    as a sum of shifted products: frames-last it needs no transposes, and torch.compile fuses it
    with the pointwise work on both sides into one pass."""
    kernel = weight.shape[1]
    half = kernel // 2
    padded = F.pad(x, (0, 0, half, half))
    frames = x.shape[1]
    out = padded[:, :frames] * weight[:, 0]
    for tap in range(1, kernel):
        out = out + padded[:, tap : tap + frames] * weight[:, tap]
    return out + bias


class GLUMBConv(nn.Module):
    """Feed-forward over frames: 1x1 expand + SiLU, depthwise conv (k=3), SiLU-gated GLU, 1x1 project.

    The checkpoint stores Conv1d weights; the 1x1 convs run as linear layers on [B*T, C] rows.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.inverted_conv = ConvLayer(dim, hidden_dim * 2, 1)
        self.depth_conv = ConvLayer(hidden_dim * 2, hidden_dim * 2, 3, groups=hidden_dim * 2)
        self.point_conv = ConvLayer(hidden_dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], frame_mask [B, T] -> [B, T, D]. Padded frames are zeroed before the
        depthwise conv so they look like the conv's own zero padding to their valid neighbours."""
        rows = x.shape[:2]
        expand, project = self.inverted_conv.conv, self.point_conv.conv
        x = F.linear(x.flatten(0, 1), expand.weight[..., 0], expand.bias).unflatten(0, rows)
        x = F.silu(x) * frame_mask[:, :, None].to(x.dtype)
        # value and gate halves convolved separately, so the conv and the gating fuse into one pass
        (value, gate), depthwise = x.chunk(2, dim=-1), self.depth_conv.conv
        weights, biases = depthwise.weight[:, 0].chunk(2), depthwise.bias.chunk(2)
        value = _depthwise_conv_frames(value, weights[0], biases[0])
        gate = _depthwise_conv_frames(gate, weights[1], biases[1])
        return F.linear((value * F.silu(gate)).flatten(0, 1), project.weight[..., 0]).unflatten(0, rows)


class LinearTransformerBlock(nn.Module):
    """adaLN-single block: linear self-attention, cross-attention (ungated, unnormed), GLUMBConv."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim, eps=NORM_EPS, elementwise_affine=False)
        self.attn = LinearSelfAttention(dim, heads, head_dim)
        self.cross_attn = CrossAttention(dim, heads, head_dim)
        self.norm2 = RMSNorm(dim, eps=NORM_EPS, elementwise_affine=False)
        self.ff = GLUMBConv(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(
        self,
        hidden_states: torch.Tensor,
        frame_mask: torch.Tensor,
        cross_key: torch.Tensor,
        cross_value: torch.Tensor,
        cross_bias: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        temb: torch.Tensor,
        q_scale: torch.Tensor | None,
    ) -> torch.Tensor:
        """hidden_states [B, T, D], cross_key/cross_value [B, H, S, head_dim] and cross_bias [B, S]
        (this block's part of `ACEStepTransformer.prepare_cross_attention`), temb [B, 6*D];
        see `ACEStepTransformer.decode` for the rest."""
        modulation = self.scale_shift_table[None] + temb.unflatten(-1, (6, -1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)

        normed = self.norm1(hidden_states) * (1 + scale_msa) + shift_msa
        hidden_states = hidden_states + gate_msa * self.attn(normed, frame_mask, rotary, q_scale)
        hidden_states = hidden_states + self.cross_attn(hidden_states, cross_key, cross_value, cross_bias, rotary, q_scale)
        normed = self.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp
        return hidden_states + gate_mlp * self.ff(normed, frame_mask)


class FinalLayer(nn.Module):
    """RMSNorm + modulation by the *un-projected* timestep embedding, linear, unpatchify."""

    def __init__(self, dim: int, patch_size: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.RMSNorm(dim, eps=NORM_EPS, elementwise_affine=False)
        self.linear = nn.Linear(dim, patch_size[0] * patch_size[1] * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.patch_height = patch_size[0]
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor, embedded_timestep: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], embedded_timestep [B, D] -> [B, out_channels, patch_height, T]."""
        shift, scale = (self.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
        x = self.linear(self.norm_final(x) * (1 + scale) + shift)
        x = x.unflatten(-1, (self.patch_height, self.out_channels))  # [B, T, P, C]
        return x.permute(0, 3, 2, 1)


class ACEStepTransformer(ModelMixin, ConfigMixin):
    """ACE-Step v1 transformer, loadable from the published `ace_step_transformer/` folder.

    Config keys are those of the published config.json (defaults: the full-size model). The lyric
    Conformer sizes are not in that file (upstream hard-codes them); the published tiny test
    checkpoint gives them under `_tiny_lyric_encoder`, honoured here. `max_position`, `max_width`,
    `ssl_names` and `ssl_encoder_depths` are accepted for loading and not used (rotary tables are
    built for the lengths at hand); `projectors.*` (training-only SSL heads) exist only so
    checkpoints load.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 8,
        num_layers: int = 24,
        inner_dim: int = 2560,
        attention_head_dim: int = 128,
        num_attention_heads: int = 20,
        mlp_ratio: float = 2.5,
        out_channels: int = 8,
        max_position: int = 32768,
        rope_theta: float = 1000000.0,
        speaker_embedding_dim: int = 512,
        text_embedding_dim: int = 768,
        ssl_encoder_depths: Sequence[int] = (8, 8),
        ssl_names: Sequence[str] = ("mert", "m-hubert"),
        ssl_latent_dims: Sequence[int] = (1024, 768),
        lyric_encoder_vocab_size: int = 6693,
        lyric_hidden_size: int = 1024,
        patch_size: Sequence[int] = (16, 1),
        max_height: int = 16,
        max_width: int = 32768,
    ) -> None:
        super().__init__()
        if inner_dim != num_attention_heads * attention_head_dim:
            raise ValueError(
                f"inner_dim: {inner_dim} != num_attention_heads * attention_head_dim "
                f"({num_attention_heads} * {attention_head_dim})"
            )
        if list(patch_size) != [max_height, 1]:
            raise ValueError(f"patch_size: expected [max_height, 1] = [{max_height}, 1], got {list(patch_size)}")
        lyric_sizes = self._lyric_encoder_sizes(lyric_hidden_size)

        self.transformer_blocks = nn.ModuleList(
            LinearTransformerBlock(inner_dim, num_attention_heads, attention_head_dim, mlp_ratio)
            for _ in range(num_layers)
        )
        self.time_proj = Timesteps(num_channels=TIMESTEP_CHANNELS, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(in_channels=TIMESTEP_CHANNELS, time_embed_dim=inner_dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(inner_dim, 6 * inner_dim))
        self.speaker_embedder = nn.Linear(speaker_embedding_dim, inner_dim)
        self.genre_embedder = nn.Linear(text_embedding_dim, inner_dim)
        self.lyric_embs = nn.Embedding(lyric_encoder_vocab_size, lyric_hidden_size)
        self.lyric_encoder = LyricConformerEncoder(input_dim=lyric_hidden_size, **lyric_sizes)
        self.lyric_proj = nn.Linear(lyric_hidden_size, inner_dim)
        self.projectors = nn.ModuleList(
            nn.Sequential(
                nn.Linear(inner_dim, 2 * inner_dim),
                nn.SiLU(),
                nn.Linear(2 * inner_dim, 2 * inner_dim),
                nn.SiLU(),
                nn.Linear(2 * inner_dim, ssl_dim),
            )
            for ssl_dim in ssl_latent_dims
        )
        self.proj_in = PatchEmbed(in_channels, patch_size, inner_dim)
        self.final_layer = FinalLayer(inner_dim, patch_size, out_channels)

    def _lyric_encoder_sizes(self, lyric_hidden_size: int) -> dict[str, int]:
        """Conformer sizes: upstream's fixed full-size values, or the tiny checkpoint's private key."""
        sizes = {"output_dim": lyric_hidden_size, "attention_heads": 16, "linear_units": 4096, "num_blocks": 6}
        recorded = self.config.get(TINY_LYRIC_ENCODER_KEY)
        if recorded is None:
            return sizes
        try:
            sizes.update(
                output_dim=int(recorded["output_size"]),
                attention_heads=int(recorded["attention_heads"]),
                linear_units=int(recorded["linear_units"]),
                num_blocks=int(recorded["num_blocks"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{TINY_LYRIC_ENCODER_KEY}: needs integer output_size, attention_heads, "
                             f"linear_units, num_blocks ({exc})") from None
        if sizes["output_dim"] != lyric_hidden_size:
            raise ValueError(f"{TINY_LYRIC_ENCODER_KEY}.output_size: {sizes['output_dim']} != "
                             f"lyric_hidden_size {lyric_hidden_size}")
        return sizes

    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """Keep the private Conformer-size key when building from a config file: diffusers drops
        `_` keys before `__init__`, which reads this one from `self.config`."""
        init_dict, unused_kwargs, hidden_dict = super().extract_init_dict(config_dict, **kwargs)
        if TINY_LYRIC_ENCODER_KEY in config_dict:
            init_dict[TINY_LYRIC_ENCODER_KEY] = config_dict[TINY_LYRIC_ENCODER_KEY]
        return init_dict, unused_kwargs, hidden_dict

    def encode(
        self,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        speaker_embeds: torch.Tensor,
        lyric_ids: torch.Tensor,
        lyric_mask: torch.Tensor,
        lyric_q_scale: float | torch.Tensor = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition tokens: [speaker | text | lyrics].

        text_states [B, Lt, text_embedding_dim], text_mask [B, Lt], speaker_embeds [B, 512],
        lyric_ids [B, Ll] int64, lyric_mask [B, Ll]; `lyric_q_scale` (float or [B] per row) scales the Conformer query
        projections of `ERG_LYRIC_LAYERS` (ERG-lyric: specs.ERG_Q_SCALE).
        Returns encoder_states [B, 1+Lt+Ll, inner_dim] and encoder_mask [B, 1+Lt+Ll] float32.
        """
        speaker = self.speaker_embedder(speaker_embeds)[:, None]
        text = self.genre_embedder(text_states)
        layer_q_scales = [
            lyric_q_scale if index in ERG_LYRIC_LAYERS else 1.0 for index in range(len(self.lyric_encoder.encoders))
        ]
        lyrics = self.lyric_proj(self.lyric_encoder(self.lyric_embs(lyric_ids), lyric_mask, layer_q_scales))
        encoder_states = torch.cat([speaker, text, lyrics], dim=1)
        speaker_mask = torch.ones(speaker.shape[0], 1, device=speaker.device)
        encoder_mask = torch.cat([speaker_mask, text_mask.float(), lyric_mask.float()], dim=1)
        return encoder_states, encoder_mask

    def prepare_cross_attention(
        self, encoder_states: torch.Tensor, encoder_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every block's cross-attention keys and values for the condition tokens, computed once.

        They depend only on the conditions, which are the same at every denoising step, so a
        sampler computes them once per request instead of once per step (~10 % of a 60 s decode's
        FLOPs). encoder_states [B, S, inner_dim] and encoder_mask [B, S] as in `decode`. Returns
        (keys_values [B, num_layers, 2, H, S, head_dim] in encoder_states' dtype, keys with
        condition-position RoPE; bias [B, S]: 0 for valid tokens, -inf for masked ones). Row b
        belongs to batch row b, so rows can be indexed, padded and concatenated like the inputs.
        """
        token_positions = ((encoder_mask > 0).long().cumsum(dim=1) - 1).clamp_min(0)
        cos, sin = rotary_cos_sin(token_positions, self.config.attention_head_dim, self.config.rope_theta)
        encoder_rotary = (cos[:, None], sin[:, None])
        keys_values = torch.stack(
            [torch.stack(block.cross_attn.keys_values(encoder_states, encoder_rotary), dim=1)
             for block in self.transformer_blocks],
            dim=1,
        )
        return keys_values, additive_mask(encoder_mask, encoder_states.dtype)

    def decode(
        self,
        latents: torch.Tensor,
        attention_mask: torch.Tensor,
        encoder_states: torch.Tensor,
        encoder_mask: torch.Tensor,
        timestep: torch.Tensor,
        q_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity for latents [B, in_channels, max_height, T] at `timestep` [B] (0..1000).

        attention_mask [B, T]: 1 for valid frames, 0 for padding at the end; encoder_states
        [B, S, inner_dim] and encoder_mask [B, S] from `encode` (padding anywhere: positions count
        valid tokens only, so a padded item gives what it gives alone). q_scale [B] or None: per
        item factor on the query projections of `ERG_DIFFUSION_BLOCKS` (ERG-diffusion branch:
        specs.ERG_Q_SCALE, others 1.0). Returns [B, out_channels, max_height, T], zero on padded frames.
        Equal to `decode_prepared` with `prepare_cross_attention(encoder_states, encoder_mask)`.
        """
        keys_values, bias = self.prepare_cross_attention(encoder_states, encoder_mask)
        return self.decode_prepared(latents, attention_mask, keys_values, bias, timestep, q_scale)

    def decode_prepared(
        self,
        latents: torch.Tensor,
        attention_mask: torch.Tensor,
        cross_keys_values: torch.Tensor,
        cross_bias: torch.Tensor,
        timestep: torch.Tensor,
        q_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`decode` with the conditions given as `prepare_cross_attention`'s output
        (cross_keys_values [B, num_layers, 2, H, S, head_dim], cross_bias [B, S])."""
        expected = (self.config.in_channels, self.config.max_height)
        if tuple(latents.shape[1:3]) != expected:
            raise ValueError(f"latents: expected shape [B, {expected[0]}, {expected[1]}, T], got {list(latents.shape)}")
        if q_scale is not None and len(self.transformer_blocks) < ERG_DIFFUSION_BLOCKS.stop:
            raise ValueError(
                f"q_scale: ERG needs {ERG_DIFFUSION_BLOCKS.stop} blocks, model has {len(self.transformer_blocks)}"
            )
        if cross_keys_values.shape[1] != len(self.transformer_blocks):
            raise ValueError(f"cross_keys_values: {cross_keys_values.shape[1]} layers, model has "
                             f"{len(self.transformer_blocks)}")
        dtype = latents.dtype
        frame_mask = attention_mask.to(dtype)

        embedded_timestep = self.timestep_embedder(self.time_proj(timestep).to(dtype))
        temb = self.t_block(embedded_timestep)

        hidden_states = self.proj_in(latents, frame_mask)
        frame_positions = torch.arange(hidden_states.shape[1], device=latents.device)
        cos, sin = rotary_cos_sin(frame_positions, self.config.attention_head_dim, self.config.rope_theta)
        rotary = (cos[None, None], sin[None, None])

        # Blocks outside the ERG range get a factor of exactly 1 rather than None, so every block
        # runs one code path (one torch.compile graph variant instead of two; x * 1.0 == x).
        unscaled = torch.ones_like(q_scale) if q_scale is not None else None
        for index, block in enumerate(self.transformer_blocks):
            hidden_states = block(
                hidden_states,
                frame_mask,
                cross_keys_values[:, index, 0],
                cross_keys_values[:, index, 1],
                cross_bias,
                rotary,
                temb,
                q_scale if index in ERG_DIFFUSION_BLOCKS else unscaled,
            )
        velocity = self.final_layer(hidden_states, embedded_timestep)
        return velocity * frame_mask[:, None, None, :]


def drop_unapplied_projections(model: ACEStepTransformer) -> ACEStepTransformer:
    """`model` (in place) without the cross-attention projections no forward applies
    (`CrossAttention.drop_unapplied`)."""
    for block in model.transformer_blocks:
        block.cross_attn.drop_unapplied()
    return model


def load_transformer(folder: str | Path) -> ACEStepTransformer:
    """The published `ace_step_transformer/` folder, loaded unchanged, then without the projections
    no forward applies: what every component process keeps."""
    return drop_unapplied_projections(ACEStepTransformer.from_pretrained(folder).eval())
