"""The tensors of each neural component, read from the checkpoint's configs.

Torch-free. Dims come from the checkpoint's configs; every spec's first axis is the batch
axis (Triton `max_batch_size` > 0), which is left out of `TensorSpec.dims` as Triton wants.
Ragged axes (-1) are padded and masked when requests are batched together. The builders here
give a component's tensors (`ComponentIO`); `acestep_triton.registry.component_spec` adds the
name and batch size the registry declares, giving the `ComponentSpec` the Triton model, the
ONNX graph and the TensorRT profile all read.
"""

from __future__ import annotations

from dataclasses import dataclass

from acestep_triton.checkpoint import TEXT_ENCODER_DIR, TRANSFORMER_DIR, Checkpoint
from acestep_triton.contract import TensorSpec
from acestep_triton.geometry import latent_geometry

# ERG (Entropy Rectifying Guidance) weakens a guidance branch by multiplying attention queries
# by this: ERG-tag in UMT5, ERG-lyric in the lyric Conformer, ERG-diffusion in the DiT blocks.
ERG_Q_SCALE = 0.01


# The serving-layer inputs the `dit_step` Triton model takes on top of its component spec, for its
# per-request condition cache (acestep_triton.condition_cache): not part of the component as a
# function, so ONNX and TensorRT never see them.
CONDITION_KEY = "CONDITION_KEY"
CONDITION_RELEASE = "CONDITION_RELEASE"
CONDITION_INPUTS = (
    TensorSpec(CONDITION_KEY, "TYPE_STRING", (1,)),
    TensorSpec(CONDITION_RELEASE, "TYPE_BOOL", (1,)),
)
# The spec inputs that a key may stand in for.
KEYED_INPUTS = ("ENCODER_STATES", "ENCODER_MASK")

# The serving-layer inputs of the components that take LoRA adapters (registry `lora`), on the
# pytorch-engine profiles: which adapter each batch row uses (its name, acestep_triton.adapters) and
# at which weight. Optional: a request without them runs the base model. Like the condition inputs
# they are not part of the component as a function (ONNX and TensorRT never see them).
ADAPTER = "ADAPTER"
ADAPTER_WEIGHT = "ADAPTER_WEIGHT"
ADAPTER_INPUTS = (
    TensorSpec(ADAPTER, "TYPE_STRING", (1,)),
    TensorSpec(ADAPTER_WEIGHT, "TYPE_FP32", (1,)),
)
# Inside a model process the rows carry the adapter as a process-local id (acestep_triton.lora.AdapterStore,
# 0 = the base model) and its weight, [N] each: per-row tensors that batch, sub-batch and split like the
# spec's inputs (acestep_triton.batching.collate carries them).
ADAPTER_ID = "ADAPTER_ID"
ADAPTER_ROWS = (ADAPTER_ID, ADAPTER_WEIGHT)

@dataclass(frozen=True)
class ComponentIO:
    """A neural component's tensors, as its spec builder reads them from the checkpoint."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # inputs whose variable axes are zero-padded (and masked) to batch requests of different lengths
    ragged_inputs: tuple[str, ...] = ()
    # (output, input): the output's variable axis has the input's length, so padding is cut off again
    ragged_outputs: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ComponentSpec:
    """A neural component as a batched function of named tensors (built by registry.component_spec)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    ragged_inputs: tuple[str, ...] = ()
    ragged_outputs: tuple[tuple[str, str], ...] = ()

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)


def text_encoder_io(ckpt: Checkpoint) -> ComponentIO:
    """UMT5 encoder; Q_SCALE < 1 gives ERG-tag ("null") states for that row."""
    d_text = ckpt.config(TEXT_ENCODER_DIR)["d_model"]
    return ComponentIO(
        inputs=(
            TensorSpec("TEXT_IDS", "TYPE_INT64", (-1,)),
            TensorSpec("TEXT_MASK", "TYPE_INT64", (-1,)),
            TensorSpec("TEXT_Q_SCALE", "TYPE_FP32", (1,)),
        ),
        outputs=(TensorSpec("TEXT_STATES", "TYPE_FP32", (-1, d_text)),),
        ragged_inputs=("TEXT_IDS", "TEXT_MASK"),
        ragged_outputs=(("TEXT_STATES", "TEXT_IDS"),),
    )


def condition_encoder_io(ckpt: Checkpoint) -> ComponentIO:
    """transformer.encode for one guidance branch per row.

    TEXT_SCALE 0 zeroes a row's text states (the null branches); LYRIC_Q_SCALE < 1 is ERG-lyric.
    Output length is 1 + text length + lyric length, so rows batch only with equal lengths.
    """
    cfg = ckpt.config(TRANSFORMER_DIR)
    return ComponentIO(
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
    )


def dit_step_io(ckpt: Checkpoint) -> ComponentIO:
    """One transformer decode: the velocity for a batch of latents (all guidance branches at once).

    Q_SCALE < 1 is ERG-diffusion for that row. Frames and condition tokens are ragged:
    ATTENTION_MASK / ENCODER_MASK mark the valid ones.
    """
    cfg, g = ckpt.config(TRANSFORMER_DIR), latent_geometry(ckpt)
    return ComponentIO(
        inputs=(
            TensorSpec("LATENTS", "TYPE_FP32", (g.channels, g.height, -1)),
            TensorSpec("ATTENTION_MASK", "TYPE_FP32", (-1,)),
            TensorSpec("ENCODER_STATES", "TYPE_FP32", (-1, cfg["inner_dim"])),
            TensorSpec("ENCODER_MASK", "TYPE_FP32", (-1,)),
            TensorSpec("TIMESTEP", "TYPE_FP32", (1,)),
            TensorSpec("Q_SCALE", "TYPE_FP32", (1,)),
        ),
        outputs=(TensorSpec("VELOCITY", "TYPE_FP32", (g.channels, g.height, -1)),),
        ragged_inputs=("LATENTS", "ATTENTION_MASK", "ENCODER_STATES", "ENCODER_MASK"),
        ragged_outputs=(("VELOCITY", "LATENTS"),),
    )


def dcae_encoder_io(ckpt: Checkpoint) -> ComponentIO:
    """Stereo audio at the vocoder's sample rate (acestep_triton.models.dcae.encoder_audio resamples
    to it) -> latents, upstream's MusicDCAE.encode: T = ceil(samples / (compression * hop)).

    Not ragged: the encoder attends over the whole input, so zero padding would change every
    latent; requests batch only with equal lengths.
    """
    g = latent_geometry(ckpt)
    return ComponentIO(
        inputs=(TensorSpec("AUDIO", "TYPE_FP32", (g.audio_channels, -1)),),
        outputs=(TensorSpec("LATENTS", "TYPE_FP32", (g.channels, g.height, -1)),),
    )


def dcae_decoder_io(ckpt: Checkpoint) -> ComponentIO:
    """Latents -> ACE-Step log-mel (scale/shift and mel denormalisation included)."""
    g = latent_geometry(ckpt)
    return ComponentIO(
        inputs=(TensorSpec("LATENTS", "TYPE_FP32", (g.channels, g.height, -1)),),
        outputs=(TensorSpec("MEL", "TYPE_FP32", (g.audio_channels, g.mel_bins, -1)),),
    )


def vocoder_io(ckpt: Checkpoint) -> ComponentIO:
    """Stereo log-mel -> 48 kHz stereo waveform (vocoder at 44.1 kHz, then resampled)."""
    g = latent_geometry(ckpt)
    return ComponentIO(
        inputs=(TensorSpec("MEL", "TYPE_FP32", (g.audio_channels, g.mel_bins, -1)),),
        outputs=(TensorSpec("WAVEFORM", "TYPE_FP32", (g.audio_channels, -1)),),
    )

