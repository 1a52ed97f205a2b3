"""Request validation names the offending field before any model code runs."""

from __future__ import annotations

import math

import pytest

from acestep_triton.contract import GenerationParams, ParameterError

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
    ],
)
def test_invalid_field_is_named(override, field) -> None:
    with pytest.raises(ParameterError) as info:
        GenerationParams(**{**GOOD, **override})
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_random_duration_and_defaults_are_accepted() -> None:
    params = GenerationParams(**GOOD, audio_duration=-1, actual_seeds=[1, 2], oss_steps=[1, 10])
    assert params.actual_seeds == (1, 2) and params.oss_steps == (1, 10)
    assert params.to_dict()["actual_seeds"] == [1, 2]
