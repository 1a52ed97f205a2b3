"""One I/O spec per neural component: the Triton model, the ONNX graph and the TensorRT profile all read it.

Torch-free. Dims come from the checkpoint's configs; every spec's first axis is the batch
axis (Triton `max_batch_size` > 0), which is left out of `TensorSpec.dims` as Triton wants.
Ragged axes (-1) are padded and masked when requests are batched together.
"""

from __future__ import annotations

from dataclasses import dataclass

from acestep_triton.checkpoint import (
    DCAE_DIR,
    TEXT_ENCODER_DIR,
    TRANSFORMER_DIR,
    VOCODER_DIR,
    Checkpoint,
)
from acestep_triton.contract import TensorSpec

LATENT_CHANNELS = 8
LATENT_HEIGHT = 16
MEL_BINS = 128
AUDIO_CHANNELS = 2
# ERG ("entropy rectifying guidance") weakens a branch by scaling attention queries by this.
ERG_Q_SCALE = 0.01


@dataclass(frozen=True)
class ComponentSpec:
    """A neural component as a batched function of named tensors."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    # inputs whose variable axes are zero-padded (and masked) to batch requests of different lengths
    ragged_inputs: tuple[str, ...] = ()
    # (output, input): the output's variable axis has the input's length, so padding is cut off again
    ragged_outputs: tuple[tuple[str, str], ...] = ()

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)


def text_encoder_spec(ckpt: Checkpoint) -> ComponentSpec:
    """UMT5 encoder; Q_SCALE < 1 gives ERG-tag ("null") states for that row."""
    d_text = ckpt.config(TEXT_ENCODER_DIR)["d_model"]
    return ComponentSpec(
        name="text_encoder",
        inputs=(
            TensorSpec("TEXT_IDS", "TYPE_INT64", (-1,)),
            TensorSpec("TEXT_MASK", "TYPE_INT64", (-1,)),
            TensorSpec("TEXT_Q_SCALE", "TYPE_FP32", (1,)),
        ),
        outputs=(TensorSpec("TEXT_STATES", "TYPE_FP32", (-1, d_text)),),
        max_batch_size=16,
        ragged_inputs=("TEXT_IDS", "TEXT_MASK"),
        ragged_outputs=(("TEXT_STATES", "TEXT_IDS"),),
    )


def condition_encoder_spec(ckpt: Checkpoint) -> ComponentSpec:
    """transformer.encode for one guidance branch per row.

    TEXT_SCALE 0 zeroes a row's text states (the null branches); LYRIC_Q_SCALE < 1 is ERG-lyric.
    Output length is 1 + text length + lyric length, so rows batch only with equal lengths.
    """
    cfg = ckpt.config(TRANSFORMER_DIR)
    return ComponentSpec(
        name="condition_encoder",
        inputs=(
            TensorSpec("TEXT_STATES", "TYPE_FP32", (-1, cfg["text_embedding_dim"])),
            TensorSpec("TEXT_MASK", "TYPE_INT64", (-1,)),
            TensorSpec("TEXT_SCALE", "TYPE_FP32", (1,)),
            TensorSpec("LYRIC_IDS", "TYPE_INT64", (-1,)),
            TensorSpec("LYRIC_MASK", "TYPE_INT64", (-1,)),
            TensorSpec("LYRIC_Q_SCALE", "TYPE_FP32", (1,)),
        ),
        outputs=(
            TensorSpec("ENCODER_STATES", "TYPE_FP32", (-1, cfg["inner_dim"])),
            TensorSpec("ENCODER_MASK", "TYPE_FP32", (-1,)),
        ),
        max_batch_size=16,
    )


def dit_step_spec(ckpt: Checkpoint) -> ComponentSpec:
    """One transformer decode: the velocity for a batch of latents (all guidance branches at once).

    Q_SCALE < 1 is ERG-diffusion for that row. Frames and condition tokens are ragged:
    ATTENTION_MASK / ENCODER_MASK mark the valid ones.
    """
    cfg = ckpt.config(TRANSFORMER_DIR)
    return ComponentSpec(
        name="dit_step",
        inputs=(
            TensorSpec("LATENTS", "TYPE_FP32", (LATENT_CHANNELS, LATENT_HEIGHT, -1)),
            TensorSpec("ATTENTION_MASK", "TYPE_FP32", (-1,)),
            TensorSpec("ENCODER_STATES", "TYPE_FP32", (-1, cfg["inner_dim"])),
            TensorSpec("ENCODER_MASK", "TYPE_FP32", (-1,)),
            TensorSpec("TIMESTEP", "TYPE_FP32", (1,)),
            TensorSpec("Q_SCALE", "TYPE_FP32", (1,)),
        ),
        outputs=(TensorSpec("VELOCITY", "TYPE_FP32", (LATENT_CHANNELS, LATENT_HEIGHT, -1)),),
        max_batch_size=64,
        ragged_inputs=("LATENTS", "ATTENTION_MASK", "ENCODER_STATES", "ENCODER_MASK"),
        ragged_outputs=(("VELOCITY", "LATENTS"),),
    )


def dcae_decoder_spec(ckpt: Checkpoint) -> ComponentSpec:
    """Latents -> ACE-Step log-mel (scale/shift and mel denormalisation included)."""
    cfg = ckpt.config(DCAE_DIR)
    return ComponentSpec(
        name="dcae_decoder",
        inputs=(TensorSpec("LATENTS", "TYPE_FP32", (cfg["latent_channels"], LATENT_HEIGHT, -1)),),
        outputs=(TensorSpec("MEL", "TYPE_FP32", (cfg["in_channels"], MEL_BINS, -1)),),
        max_batch_size=8,
    )


def vocoder_spec(ckpt: Checkpoint) -> ComponentSpec:
    """Stereo log-mel -> 48 kHz stereo waveform (vocoder at 44.1 kHz, then resampled)."""
    n_mels = ckpt.config(VOCODER_DIR)["n_mels"]
    return ComponentSpec(
        name="vocoder",
        inputs=(TensorSpec("MEL", "TYPE_FP32", (AUDIO_CHANNELS, n_mels, -1)),),
        outputs=(TensorSpec("WAVEFORM", "TYPE_FP32", (AUDIO_CHANNELS, -1)),),
        max_batch_size=8,
    )


COMPONENT_SPECS = {
    "text_encoder": text_encoder_spec,
    "condition_encoder": condition_encoder_spec,
    "dit_step": dit_step_spec,
    "dcae_decoder": dcae_decoder_spec,
    "vocoder": vocoder_spec,
}


# The neural components, in pipeline order: one name per component everywhere.
NEURAL_COMPONENTS = tuple(COMPONENT_SPECS)


def component_spec(name: str, ckpt: Checkpoint) -> ComponentSpec:
    if name not in COMPONENT_SPECS:
        raise KeyError(f"unknown component {name!r}; known: {sorted(COMPONENT_SPECS)}")
    return COMPONENT_SPECS[name](ckpt)
