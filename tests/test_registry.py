"""The component registry and the facts kept in one place: every reference resolves, orders agree,
shapes come from the checkpoint's configs."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from acestep_triton.checkpoint import DCAE_DIR, TRANSFORMER_DIR, Checkpoint, CheckpointError, validate_checkpoint
from acestep_triton.contract import (
    AUDIO_INPUT_TASKS,
    ENSEMBLE_INPUTS,
    SAMPLING_PARAMS,
    SOURCE_INPUTS,
    STAGES,
    TASK_INPUTS,
    GenerationParams,
)
from acestep_triton.geometry import PUBLISHED_GEOMETRY, latent_geometry
from acestep_triton.registry import COMPONENTS, NEURAL_COMPONENTS, component, component_spec, resolve
from acestep_triton.sampling.seeds import make_generators
from acestep_triton.sampling.tasks import generate
from export.build_repository import PROFILES, PUBLISHED_CONFIGS, diffusion_model


def test_components_follow_the_stage_order() -> None:
    """Components that are ensemble stages are declared in contract.STAGES order (dit_step runs inside
    the diffusion stage)."""
    assert [n for n in NEURAL_COMPONENTS if n in STAGES] == [s for s in STAGES if s in COMPONENTS]
    assert NEURAL_COMPONENTS.index("dit_step") < NEURAL_COMPONENTS.index("dcae_decoder")


@pytest.mark.parametrize("name", NEURAL_COMPONENTS)
def test_every_reference_resolves(name: str) -> None:
    """A typo in a "module:attribute" string fails here, not in a code path only a GPU runs."""
    entry = component(name)
    for reference in (entry.loader, entry.module, entry.samples, entry.acceleration, entry.low_vram):
        if reference:
            assert callable(resolve(reference)), reference


def test_unknown_component_is_named() -> None:
    with pytest.raises(KeyError, match="unknown component 'flux_encoder'"):
        component("flux_encoder")


def test_spec_takes_its_batch_size_from_the_registry(golden_ckpt: Path) -> None:
    ckpt = validate_checkpoint(golden_ckpt)
    for name in NEURAL_COMPONENTS:
        spec = component_spec(name, ckpt)
        assert spec.name == name and spec.max_batch_size == component(name).batching.max_batch_size


def test_geometry_comes_from_the_configs(golden_ckpt: Path, tmp_path: Path) -> None:
    published = Checkpoint(PUBLISHED_CONFIGS)
    assert latent_geometry(published) == latent_geometry(validate_checkpoint(golden_ckpt)) == PUBLISHED_GEOMETRY
    assert PUBLISHED_GEOMETRY.height == 16 and PUBLISHED_GEOMETRY.frames(5.0) == 53
    assert PUBLISHED_GEOMETRY.frame_seconds == pytest.approx(8 * 512 / 44100)
    # the transformer's own view of the latents agrees with the DCAE's and the vocoder's
    transformer = published.config(TRANSFORMER_DIR)
    assert (transformer["in_channels"], transformer["max_height"]) == (PUBLISHED_GEOMETRY.channels,
                                                                       PUBLISHED_GEOMETRY.height)
    # a checkpoint whose DCAE compresses once more is refused, naming what differs
    other = tmp_path / "ckpt"
    shutil.copytree(PUBLISHED_CONFIGS, other)
    config = json.loads((other / DCAE_DIR / "config.json").read_text())
    config["decoder_block_out_channels"].append(64)
    (other / DCAE_DIR / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="compression=16"):
        latent_geometry(Checkpoint(other))


def test_speaker_width_comes_from_the_transformer_config(golden_ckpt: Path) -> None:
    from acestep_triton.components import load_component
    from export.samples import PARITY_SIZES, sample_inputs

    ckpt = validate_checkpoint(golden_ckpt)
    module = load_component("condition_encoder", ckpt)
    assert module.transformer.config.speaker_embedding_dim == ckpt.config(TRANSFORMER_DIR)["speaker_embedding_dim"]
    inputs = sample_inputs("condition_encoder", ckpt, PARITY_SIZES)
    states, mask = module(*inputs.values())
    assert states.shape[:2] == mask.shape == (PARITY_SIZES.batch, PARITY_SIZES.condition_tokens)


class _Recording(GenerationParams):
    """GenerationParams that notes every field read (a real request: validated like any other)."""

    def __getattribute__(self, name: str):
        if name in {f.name for f in fields(GenerationParams)}:
            object.__getattribute__(self, "__dict__").setdefault("_read", set()).add(name)
        return object.__getattribute__(self, name)


@pytest.mark.parametrize("overrides", [
    {}, {"scheduler_type": "heun", "cfg_type": "cfg"}, {"scheduler_type": "pingpong", "oss_steps": (2, 5, 9)},
    {"guidance_scale_text": 2.0, "guidance_scale_lyric": 3.0, "guidance_interval_decay": 0.5},
    {"task": "retake", "retake_variance": 0.4}, {"task": "repaint", "repaint_start": 0.1, "repaint_end": 0.2},
    {"task": "extend", "repaint_start": -0.2}, {"task": "edit", "edit_n_max": 0.5, "edit_n_avg": 2},
    {"task": "audio2audio", "ref_audio_strength": 0.3},
])
def test_the_loop_reads_only_the_sampling_params(overrides: dict) -> None:
    """SAMPLING_PARAMS decides which ensemble inputs the `diffusion` model gets; the loop must not
    read any other field, or a Triton deployment would silently use its default."""
    params = _Recording(prompt="", lyrics="", infer_step=4, actual_seeds=(1,), audio_duration=0.3, **overrides)
    object.__getattribute__(params, "__dict__").pop("_read", None)  # validation reads everything
    source = torch.zeros(1, 8, 16, 5) if params.task in AUDIO_INPUT_TASKS else None
    generate(lambda x, t, branches: torch.zeros_like(x), params, make_generators([1]), make_generators([2]), 0.3,
             source)
    read = object.__getattribute__(params, "__dict__")["_read"]
    assert read <= SAMPLING_PARAMS, read - SAMPLING_PARAMS


def test_diffusion_model_takes_exactly_the_sampling_inputs() -> None:
    model = diffusion_model(Checkpoint(PUBLISHED_CONFIGS), PROFILES["cpu"])
    taken = {t.name for t in model.inputs}
    inputs = (*ENSEMBLE_INPUTS, *TASK_INPUTS)
    assert {t.name for t in inputs if t.param in SAMPLING_PARAMS} | set(SOURCE_INPUTS) <= taken
    assert not {t.name for t in inputs if t.param and t.param not in SAMPLING_PARAMS} & taken
