"""Valid inputs for each component spec at chosen axis lengths: export samples, parity checks, engine shapes.

Every variable axis of every component is one of four named lengths (`Sizes`): the batch, the
prompt tokens, the lyric tokens and the latent frames; the others follow from them (condition
tokens = 1 + text + lyric, mel frames = latent frames x the DCAE's compression). Static dims
come from the spec, so the tensors always match it (`sample_inputs` checks). Values are valid
for the models: token ids inside the vocabularies, masks padded at the end with row 0 full, ERG
and text scales alternating per row, timesteps in [0, 1000). On the `meta` device nothing is
drawn: only the shapes exist, which is how engine profiles get their (large) max shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from acestep_triton.checkpoint import TEXT_ENCODER_DIR, TRANSFORMER_DIR, Checkpoint
from acestep_triton.contract import TensorSpec
from acestep_triton.registry import component, component_spec, resolve
from acestep_triton.geometry import latent_geometry
from acestep_triton.specs import ERG_Q_SCALE, ComponentSpec

TORCH_DTYPES = {"TYPE_FP32": torch.float32, "TYPE_FP16": torch.float16, "TYPE_BF16": torch.bfloat16,
                "TYPE_INT64": torch.int64, "TYPE_INT32": torch.int32, "TYPE_BOOL": torch.bool}
MAX_TIMESTEP = 1000.0


@dataclass(frozen=True)
class Sizes:
    """Lengths of the named variable axes."""

    batch: int
    text_tokens: int
    lyric_tokens: int
    latent_frames: int

    @property
    def condition_tokens(self) -> int:
        """ENCODER_STATES length: speaker token + text + lyrics."""
        return 1 + self.text_tokens + self.lyric_tokens


# Export samples: every length distinct and >= 2, since torch.export specialises sizes 0 and 1
# and gives equal sample sizes one symbol (the graph would then demand they stay equal).
EXPORT_SIZES = Sizes(batch=2, text_tokens=7, lyric_tokens=11, latent_frames=13)
# The parity check after each export runs other lengths, so shapes baked into a graph fail it.
PARITY_SIZES = Sizes(batch=3, text_tokens=5, lyric_tokens=9, latent_frames=6)


class Draw:
    """Random tensors from one seeded generator on the CPU, moved to `device`; only shapes on `meta`."""

    def __init__(self, seed: int, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def meta(self) -> bool:
        return self.device.type == "meta"

    def _out(self, make: Callable[[], torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.meta:
            return torch.empty(shape, dtype=dtype, device="meta")
        return make().to(self.device)

    def ones(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._out(lambda: torch.ones(shape), shape, torch.float32)

    def normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._out(lambda: torch.randn(shape, generator=self.generator), shape, torch.float32)

    def uniform(self, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        return self._out(lambda: low + (high - low) * torch.rand(shape, generator=self.generator), shape,
                         torch.float32)

    def token_ids(self, mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Ids in [0, vocab_size) where mask is 1, 0 (padding) elsewhere."""
        shape = tuple(mask.shape)
        return self._out(lambda: torch.randint(0, vocab_size, shape, generator=self.generator) * mask.cpu(),
                         shape, torch.int64)

    def prefix_mask(self, batch: int, length: int) -> torch.Tensor:
        """int64 [batch, length]: row 0 all ones, row b ones for a random length in [1, length], then zeros."""
        def make() -> torch.Tensor:
            valid = torch.randint(1, length + 1, (batch,), generator=self.generator)
            valid[0] = length
            return (torch.arange(length)[None, :] < valid[:, None]).long()

        return self._out(make, (batch, length), torch.int64)

    def alternating(self, batch: int, first: float, second: float) -> torch.Tensor:
        """float32 [batch, 1]: first, second, first, ... (so a batch of two has both)."""
        return self._out(lambda: torch.tensor([[first if b % 2 == 0 else second] for b in range(batch)]),
                         (batch, 1), torch.float32)


def _shape(tensor: TensorSpec, batch: int, *lengths: int) -> tuple[int, ...]:
    """The tensor's dims with the batch axis prepended and each -1 replaced by the next of `lengths`."""
    fill = iter(lengths)
    dims = tuple(next(fill) if d == -1 else d for d in tensor.dims)
    if next(fill, None) is not None or -1 in dims:
        raise ValueError(f"{tensor.name}: dims {tensor.dims} do not take lengths {lengths}")
    return (batch, *dims)


def text_encoder_samples(spec: ComponentSpec, ckpt: Checkpoint, s: Sizes, draw: Draw) -> tuple[torch.Tensor, ...]:
    ids, mask, q_scale = spec.inputs
    vocab_size = ckpt.config(TEXT_ENCODER_DIR)["vocab_size"]
    text_mask = draw.prefix_mask(s.batch, s.text_tokens)
    return (draw.token_ids(text_mask, vocab_size).reshape(_shape(ids, s.batch, s.text_tokens)),
            text_mask.reshape(_shape(mask, s.batch, s.text_tokens)),
            draw.alternating(s.batch, 1.0, ERG_Q_SCALE).reshape(_shape(q_scale, s.batch)))


def condition_encoder_samples(spec: ComponentSpec, ckpt: Checkpoint, s: Sizes, draw: Draw) -> tuple[torch.Tensor, ...]:
    states, text_mask_spec, text_scale, lyric_ids, lyric_mask_spec, lyric_q_scale = spec.inputs
    vocab_size = ckpt.config(TRANSFORMER_DIR)["lyric_encoder_vocab_size"]
    text_mask = draw.prefix_mask(s.batch, s.text_tokens)
    lyric_mask = draw.prefix_mask(s.batch, s.lyric_tokens)
    return (draw.normal(_shape(states, s.batch, s.text_tokens)),
            text_mask.reshape(_shape(text_mask_spec, s.batch, s.text_tokens)),
            draw.alternating(s.batch, 1.0, 0.0).reshape(_shape(text_scale, s.batch)),
            draw.token_ids(lyric_mask, vocab_size).reshape(_shape(lyric_ids, s.batch, s.lyric_tokens)),
            lyric_mask.reshape(_shape(lyric_mask_spec, s.batch, s.lyric_tokens)),
            draw.alternating(s.batch, ERG_Q_SCALE, 1.0).reshape(_shape(lyric_q_scale, s.batch)))


def dit_step_samples(spec: ComponentSpec, ckpt: Checkpoint, s: Sizes, draw: Draw) -> tuple[torch.Tensor, ...]:
    latents, attention_mask, states, encoder_mask, timestep, q_scale = spec.inputs
    frames = draw.prefix_mask(s.batch, s.latent_frames).float()
    # [speaker | text | lyrics]: padding sits inside the sequence, as the condition encoder lays it out
    condition = torch.cat([draw.ones((s.batch, 1)), draw.prefix_mask(s.batch, s.text_tokens).float(),
                           draw.prefix_mask(s.batch, s.lyric_tokens).float()], dim=1)
    return (draw.normal(_shape(latents, s.batch, s.latent_frames)),
            frames.reshape(_shape(attention_mask, s.batch, s.latent_frames)),
            draw.normal(_shape(states, s.batch, s.condition_tokens)),
            condition.reshape(_shape(encoder_mask, s.batch, s.condition_tokens)),
            draw.uniform(_shape(timestep, s.batch), 0.0, MAX_TIMESTEP),
            draw.alternating(s.batch, 1.0, ERG_Q_SCALE).reshape(_shape(q_scale, s.batch)))


def dcae_encoder_samples(spec: ComponentSpec, ckpt: Checkpoint, s: Sizes, draw: Draw) -> tuple[torch.Tensor, ...]:
    """Audio of latent_frames - 1 frames and a part (so the encoder pads it to latent_frames), in [-1, 1)."""
    (audio,) = spec.inputs
    g = latent_geometry(ckpt)
    samples = (s.latent_frames - 1) * g.compression * g.hop_length + g.hop_length + 1
    return (draw.uniform(_shape(audio, s.batch, samples), -1.0, 1.0),)


def dcae_decoder_samples(spec: ComponentSpec, ckpt: Checkpoint, s: Sizes, draw: Draw) -> tuple[torch.Tensor, ...]:
    (latents,) = spec.inputs
    return (draw.normal(_shape(latents, s.batch, s.latent_frames)),)


def vocoder_samples(spec: ComponentSpec, ckpt: Checkpoint, s: Sizes, draw: Draw) -> tuple[torch.Tensor, ...]:
    from acestep_triton.models.dcae import MEL_MAX, MEL_MIN

    (mel,) = spec.inputs
    mel_frames = s.latent_frames * latent_geometry(ckpt).compression
    return (draw.uniform(_shape(mel, s.batch, mel_frames), MEL_MIN, MEL_MAX),)


def sample_inputs(name: str, ckpt: Checkpoint, sizes: Sizes, seed: int = 0,
                  device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """{input name: tensor} in spec order for component `name` at `sizes` (shapes only on `meta`)."""
    spec = component_spec(name, ckpt)
    tensors = resolve(component(name).samples)(spec, ckpt, sizes, Draw(seed, device))
    if len(tensors) != len(spec.inputs):
        raise ValueError(f"{name}: built {len(tensors)} inputs for {len(spec.inputs)} in the spec")
    for tensor_spec, tensor in zip(spec.inputs, tensors):
        static = [(i, d) for i, d in enumerate(tensor_spec.dims, start=1) if d != -1]
        if (tensor.dtype != TORCH_DTYPES[tensor_spec.dtype] or tensor.ndim != 1 + len(tensor_spec.dims)
                or any(tensor.shape[i] != d for i, d in static)):
            raise ValueError(f"{name}.{tensor_spec.name}: built {tensor.dtype} {list(tensor.shape)}, "
                             f"spec says {tensor_spec.dtype} [batch, {', '.join(map(str, tensor_spec.dims))}]")
    return {t.name: tensor for t, tensor in zip(spec.inputs, tensors)}


def input_shapes(name: str, ckpt: Checkpoint, sizes: Sizes) -> dict[str, tuple[int, ...]]:
    """{input name: full shape} at `sizes`, without allocating anything."""
    return {k: tuple(v.shape) for k, v in sample_inputs(name, ckpt, sizes, device="meta").items()}
