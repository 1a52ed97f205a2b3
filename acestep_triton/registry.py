"""Every neural component declared once: what it computes, where its weights are, how it runs.

A `Component` holds every fact about one component that used to be spread over the tree: its
tensors (a builder in acestep_triton.specs), the checkpoint folder and loader of its weights,
the submodules of a shared model it runs, its module (acestep_triton.components), its sample
inputs (export.samples), its speed-up hook for the gpu profile (acestep_triton.acceleration), its
memory hook for the lowvram profile (acestep_triton.low_vram) and its Triton batching. The
in-process engines, the ONNX export, the TensorRT build and the model repository generator all read
`COMPONENTS`; adding a component is one entry here plus its module (docs/architecture.md).

Torch-free at import, so the gateway and the config generator can read it: code that needs
torch is named as "module:attribute" and imported only when `resolve` is called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from acestep_triton.checkpoint import DCAE_DIR, TEXT_ENCODER_DIR, TRANSFORMER_DIR, VOCODER_DIR, Checkpoint
from acestep_triton.specs import (
    ComponentIO,
    ComponentSpec,
    condition_encoder_io,
    dcae_decoder_io,
    dcae_encoder_io,
    dit_step_io,
    text_encoder_io,
    vocoder_io,
)

@dataclass(frozen=True)
class Batching:
    """How Triton batches a component: the most rows one execute() takes. What a deployment tunes by
    measurement (queue delays, instances per model, GPUs) is a setting of its profile
    (export.build_repository.Profile), not a fact of the component."""

    max_batch_size: int


@dataclass(frozen=True)
class Component:
    """One neural component. `loader`, `module`, `samples` and `acceleration` are "module:attribute"
    references, imported by `resolve` when used.

    loader: callable(folder path) -> the loaded model; components naming the same loader and folder
        share one loaded model (condition_encoder and dit_step share the transformer).
    parts: the submodules of that model this component runs; a shared model keeps the union of its
        users' parts and drops the rest (empty: keep everything).
    module: callable(model) -> nn.Module whose forward is exactly the spec (positional inputs in spec
        order, a tuple of outputs in spec order).
    samples: callable(spec, ckpt, sizes, draw) -> valid inputs in spec order (export.samples).
    acceleration: callable(engine, settings) applying the gpu profile's speed-ups, or "" for none.
    plan: whether TensorRT can build it; False keeps it on the python backend's pytorch engine in the
        tensorrt profile.
    low_vram: callable(engine, settings) applying the lowvram profile's memory settings
        (acestep_triton.low_vram), or "" for none.
    lora: the component's module runs `module.transformer`, which takes LoRA adapters per batch row
        (acestep_triton.lora); its Triton model then takes specs.ADAPTER_INPUTS on the pytorch engine.
    """

    name: str
    io: Callable[[Checkpoint], ComponentIO]
    folder: str
    loader: str
    module: str
    samples: str
    batching: Batching
    parts: tuple[str, ...] = ()
    acceleration: str = ""
    plan: bool = True
    low_vram: str = ""
    lora: bool = False


def resolve(reference: str) -> Any:
    """The object a "package.module:attribute.attribute" reference names (imports the module)."""
    module_name, _, attribute = reference.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


# condition_encoder and dit_step share it; `projectors`, its training-only SSL heads, are in neither's
# parts, and the cross-attention projections no forward applies are dropped at load, so no process
# keeps them.
_TRANSFORMER = "acestep_triton.models.transformer:load_transformer"

# In pipeline order (contract.STAGES; a test holds them to it). dcae_encoder is no ensemble stage: the
# `diffusion` loop calls it (BLS) for the tasks that start from audio (contract.AUDIO_INPUT_TASKS).
COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component(
            name="text_encoder",
            io=text_encoder_io,
            folder=TEXT_ENCODER_DIR,
            loader="acestep_triton.models.text_encoder:TextEncoder.from_pretrained",
            module="acestep_triton.components:TextEncoderComponent",
            samples="export.samples:text_encoder_samples",
            acceleration="acestep_triton.acceleration:accelerate_encoder",
            batching=Batching(max_batch_size=16),
        ),
        Component(
            name="condition_encoder",
            io=condition_encoder_io,
            folder=TRANSFORMER_DIR,
            loader=_TRANSFORMER,
            parts=("speaker_embedder", "genre_embedder", "lyric_embs", "lyric_encoder", "lyric_proj"),
            module="acestep_triton.components:ConditionEncoderComponent",
            samples="export.samples:condition_encoder_samples",
            acceleration="acestep_triton.acceleration:accelerate_encoder",
            batching=Batching(max_batch_size=16),
            lora=True,
        ),
        Component(
            name="dcae_encoder",
            io=dcae_encoder_io,
            folder=DCAE_DIR,
            loader="acestep_triton.models.dcae:load_audio_encoder",
            module="acestep_triton.components:DcaeEncoderComponent",
            samples="export.samples:dcae_encoder_samples",
            batching=Batching(max_batch_size=4),
            # its log-mel is an ONNX STFT, which TensorRT's ONNX parser does not take; it runs once
            # per request (not per step), so the python backend costs little there
            plan=False,
        ),
        Component(
            name="dit_step",
            io=dit_step_io,
            folder=TRANSFORMER_DIR,
            loader=_TRANSFORMER,
            parts=("transformer_blocks", "time_proj", "timestep_embedder", "t_block", "proj_in", "final_layer"),
            module="acestep_triton.components:DiTStepComponent",
            samples="export.samples:dit_step_samples",
            acceleration="acestep_triton.acceleration:accelerate_dit_step",
            low_vram="acestep_triton.low_vram:prepare_dit_step",
            batching=Batching(max_batch_size=64),
            lora=True,
        ),
        Component(
            name="dcae_decoder",
            io=dcae_decoder_io,
            folder=DCAE_DIR,
            loader="acestep_triton.models.dcae:load_dcae",
            parts=("decoder",),  # the encoder's 78 M parameters stay out of this process
            module="acestep_triton.components:DcaeDecoderComponent",
            samples="export.samples:dcae_decoder_samples",
            acceleration="acestep_triton.acceleration:accelerate_dcae_decoder",
            low_vram="acestep_triton.low_vram:prepare_dcae_decoder",
            batching=Batching(max_batch_size=8),
        ),
        Component(
            name="vocoder",
            io=vocoder_io,
            folder=VOCODER_DIR,
            loader="acestep_triton.models.vocoder:load_vocoder",
            module="acestep_triton.components:VocoderComponent",
            samples="export.samples:vocoder_samples",
            acceleration="acestep_triton.acceleration:accelerate_vocoder",
            low_vram="acestep_triton.low_vram:prepare_vocoder",
            batching=Batching(max_batch_size=8),
        ),
    )
}

# The neural components, in pipeline order: one name per component everywhere.
NEURAL_COMPONENTS = tuple(COMPONENTS)


def component(name: str) -> Component:
    """The declaration of `name` (KeyError naming the known ones otherwise)."""
    if name not in COMPONENTS:
        raise KeyError(f"unknown component {name!r}; known: {list(COMPONENTS)}")
    return COMPONENTS[name]


def component_spec(name: str, ckpt: Checkpoint) -> ComponentSpec:
    """The spec of `name` for `ckpt`: its tensors from the checkpoint's configs, its batch size from here."""
    entry = component(name)
    io = entry.io(ckpt)
    return ComponentSpec(name=entry.name, inputs=io.inputs, outputs=io.outputs,
                         max_batch_size=entry.batching.max_batch_size, ragged_inputs=io.ragged_inputs,
                         ragged_outputs=io.ragged_outputs)
