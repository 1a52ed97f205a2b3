"""Request validation names the offending field before any model code runs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from acestep_triton.contract import GenerationParams, ParameterError, SourceAudio, validate_source
from acestep_triton.geometry import PUBLISHED_GEOMETRY

GOOD = dict(prompt="pop", lyrics="[verse]\nla")


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"infer_step": 0}, "infer_step"),
        ({"infer_step": 2.5}, "infer_step"),
        ({"scheduler_type": "ddim"}, "scheduler_type"),
        ({"cfg_type": "pag"}, "cfg_type"),
        ({"audio_duration": 0.0}, "audio_duration"),
        ({"audio_duration": 241.0}, "audio_duration"),
        ({"audio_duration": math.nan}, "audio_duration"),
        ({"guidance_scale": math.inf}, "guidance_scale"),
        ({"guidance_interval": 1.5}, "guidance_interval"),
        ({"oss_steps": (0, 5)}, "oss_steps"),
        ({"oss_steps": (5, 5)}, "oss_steps"),
        ({"oss_steps": (1, 5), "scheduler_type": "heun"}, "oss_steps"),
        ({"actual_seeds": (-1,)}, "actual_seeds"),
        ({"actual_seeds": (2**32,)}, "actual_seeds"),
        ({"use_erg_tag": "false"}, "use_erg_tag"),
        ({"lyrics": "x" * 20000}, "lyrics"),
        ({"task": "remix"}, "task"),
        # a mode field its task does not read, set away from its default
        ({"retake_variance": 0.2}, "retake_variance"),
        ({"task": "retake", "repaint_start": 1.0}, "repaint_start"),
        ({"task": "edit", "retake_variance": 0.7}, "retake_variance"),
        ({"task": "audio2audio", "edit_n_avg": 2}, "edit_n_avg"),
        ({"task": "repaint", "ref_audio_strength": 0.3, "repaint_end": 1.0}, "ref_audio_strength"),
        # ranges
        ({"task": "retake", "retake_variance": 1.5}, "retake_variance"),
        ({"task": "retake", "retake_seeds": (2**32,)}, "retake_seeds"),
        ({"task": "repaint", "repaint_start": 3.0, "repaint_end": 3.0}, "repaint_end"),
        ({"task": "repaint", "repaint_start": -1.0, "repaint_end": 3.0}, "repaint_start"),
        ({"task": "extend", "repaint_start": 0.0, "repaint_end": 0.0}, "repaint_start"),
        ({"task": "edit", "edit_n_min": 0.8, "edit_n_max": 0.2}, "edit_n_min"),
        ({"task": "edit", "edit_n_max": 1.2}, "edit_n_max"),
        ({"task": "edit", "edit_n_avg": 0}, "edit_n_avg"),
        ({"task": "audio2audio", "ref_audio_strength": -0.1}, "ref_audio_strength"),
        ({"lora_weight": 1.5}, "lora_weight"),
        ({"lora_name_or_path": ""}, "lora_name_or_path"),
    ],
)
def test_invalid_field_is_named(override, field) -> None:
    with pytest.raises(ParameterError) as info:
        GenerationParams(**{**GOOD, **override})
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_each_task_takes_its_own_fields() -> None:
    """The fields of the task table (README) are accepted for their task."""
    GenerationParams(**GOOD, task="retake", retake_seeds=[5], retake_variance=0.2)
    GenerationParams(**GOOD, task="repaint", repaint_start=1.0, repaint_end=3.0, retake_variance=0.7)
    GenerationParams(**GOOD, task="extend", repaint_start=-2.0, repaint_end=6.0, retake_variance=1.0)
    GenerationParams(**GOOD, task="edit", edit_target_prompt="x", edit_target_lyrics="y", edit_n_min=0.2,
                     edit_n_max=0.8, edit_n_avg=2, retake_seeds=[12])
    GenerationParams(**GOOD, task="audio2audio", ref_audio_strength=0.8, lora_name_or_path="mine", lora_weight=0.7)


def test_random_duration_and_defaults_are_accepted() -> None:
    params = GenerationParams(**GOOD, audio_duration=-1, actual_seeds=[1, 2], oss_steps=[1, 10])
    assert params.actual_seeds == (1, 2) and params.oss_steps == (1, 10)
    assert params.to_dict()["actual_seeds"] == [1, 2]


SOURCE_6S = SourceAudio(np.zeros((2, 288000), dtype=np.float32), 48000)  # the golden source: 65 latent frames


def test_source_frames_follow_upstreams_encode() -> None:
    """6.000 s at 48 kHz resamples to 264600 samples and pads to 65 frames (golden/ext enc1: latents [1,8,16,65])."""
    assert PUBLISHED_GEOMETRY.source_frames(288000, 48000) == 65
    assert PUBLISHED_GEOMETRY.source_frames(4096, 44100) == 1 and PUBLISHED_GEOMETRY.source_frames(4097, 44100) == 2
    assert PUBLISHED_GEOMETRY.frames(-2.0) == -21  # truncation toward zero, as the golden x1 case


@pytest.mark.parametrize(
    ("override", "source", "field"),
    [
        ({"task": "repaint", "repaint_start": 1.0, "repaint_end": 6.2}, SOURCE_6S, "repaint_end"),
        ({"task": "repaint", "repaint_start": 1.0, "repaint_end": 1.02}, SOURCE_6S, "repaint_end"),
        ({"task": "repaint", "repaint_start": 1.0, "repaint_end": 3.0}, None, "src_audio_path"),
        ({"task": "audio2audio"}, None, "ref_audio_input"),
        ({}, SOURCE_6S, "src_audio_path"),
        ({"task": "extend", "repaint_start": 0.0, "repaint_end": 6.0}, SOURCE_6S, "repaint_start"),
        ({"task": "extend", "repaint_start": -7.0, "repaint_end": 6.0}, SOURCE_6S, "repaint_start"),
        ({"task": "extend", "repaint_start": 0.0, "repaint_end": 13.0}, SOURCE_6S, "repaint_end"),
        ({"task": "extend", "repaint_start": -20.0, "repaint_end": 239.0},
         SourceAudio(np.zeros((1, 44100 * 230), dtype=np.float32), 44100), "repaint_end"),
        ({"task": "edit"}, SourceAudio(np.zeros((1, 44100 * 241), dtype=np.float32), 44100), "src_audio_path"),
        ({"task": "edit"}, SourceAudio(np.zeros((3, 4410), dtype=np.float32), 44100), "src_audio_path"),
    ],
)
def test_audio_input_that_does_not_fit_is_named(override, source, field) -> None:
    params = GenerationParams(**{**GOOD, **override})
    with pytest.raises(ParameterError) as info:
        validate_source(params, source)
    assert info.value.field == field


def test_audio_inputs_that_fit_are_accepted() -> None:
    validate_source(GenerationParams(**GOOD, task="repaint", repaint_start=1.0, repaint_end=3.0), SOURCE_6S)
    validate_source(GenerationParams(**GOOD, task="repaint", repaint_start=0.0, repaint_end=6.04), SOURCE_6S)
    validate_source(GenerationParams(**GOOD, task="extend", repaint_start=-2.0, repaint_end=6.0), SOURCE_6S)
    validate_source(GenerationParams(**GOOD, task="extend", repaint_start=-6.0, repaint_end=12.0), SOURCE_6S)
    validate_source(GenerationParams(**GOOD, task="edit"), SourceAudio(np.zeros((1, 22050), dtype=np.float32), 22050))
    validate_source(GenerationParams(**GOOD), None)
