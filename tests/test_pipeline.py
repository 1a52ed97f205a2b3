"""The in-process pipeline reproduces the official implementation end to end on its tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from acestep_triton.contract import STAGES, GenerationParams
from acestep_triton.pipeline import Text2MusicPipeline
from tests.golden_cases import GOLDEN_CASES, golden_params, golden_tensors

pytestmark = pytest.mark.slow  # whole generations through the in-process pipeline


@pytest.fixture(scope="module")
def pipeline(golden_ckpt, lyric_vocab) -> Text2MusicPipeline:
    return Text2MusicPipeline.from_checkpoint(golden_ckpt, lyric_vocab)


def _max_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_case_end_to_end(pipeline, golden_dir, case) -> None:
    params = golden_params(golden_dir, case)
    ref = golden_tensors(golden_dir, case)
    prepared = pipeline.prepare(params)
    assert prepared.lyric_ids[0].tolist() == ref["lyric_token_ids"][0].tolist()
    assert prepared.text_ids[0].tolist() == ref["text_input_ids"][0].tolist()

    result = pipeline(params)
    assert result.seeds == params.actual_seeds
    assert result.waveforms.shape == (1, *ref["final_waveform"].shape)
    err = _max_err(result.waveforms[0], ref["final_waveform"])
    assert err < 1e-4, f"{case}: waveform max abs error {err:.2e}"
    assert set(result.timings) == set(STAGES)


def test_final_latents_match(pipeline, golden_dir) -> None:
    """Chain check on the latents themselves (golden README: atol 1e-4)."""
    case = "b_heun_cfg_noerg"
    params = golden_params(golden_dir, case)
    ref = golden_tensors(golden_dir, case)
    captured = {}
    dcae = pipeline.engines["dcae_decoder"]

    def spy(batch):
        captured["latents"] = batch["LATENTS"].clone()
        return dcae(batch)

    pipeline.engines["dcae_decoder"] = spy
    try:
        pipeline(params)
    finally:
        pipeline.engines["dcae_decoder"] = dcae
    assert _max_err(captured["latents"][0], ref["final_latents"][0]) < 1e-4


def test_several_seeds_give_one_item_each(pipeline) -> None:
    params = GenerationParams(prompt="pop", lyrics="[verse]\nla la", audio_duration=2.0, infer_step=3,
                              actual_seeds=(1, 2))
    result = pipeline(params)
    assert result.waveforms.shape[0] == 2
    assert not np.array_equal(result.waveforms[0], result.waveforms[1])
    solo = pipeline(GenerationParams(prompt="pop", lyrics="[verse]\nla la", audio_duration=2.0, infer_step=3,
                                     actual_seeds=(2,)))
    assert _max_err(solo.waveforms[0], result.waveforms[1]) < 1e-4


def test_random_duration_is_reproducible(pipeline) -> None:
    prepared = pipeline.prepare(GenerationParams(prompt="pop", lyrics="", audio_duration=-1, actual_seeds=(5,)))
    again = pipeline.prepare(GenerationParams(prompt="pop", lyrics="", audio_duration=-1, actual_seeds=(5,)))
    assert 30.0 <= prepared.duration <= 240.0
    assert prepared.duration == again.duration
