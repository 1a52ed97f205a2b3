"""The in-process pipeline reproduces the official implementation end to end on its tiny checkpoint, every task."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from acestep_triton.contract import STAGES, GenerationParams
from acestep_triton.pipeline import Text2MusicPipeline
from tests.golden_cases import EXT_CASES, GOLDEN_CASES, ext_request, ext_tensors, golden_params, golden_tensors

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


@pytest.mark.parametrize("case", EXT_CASES)
def test_task_case_end_to_end(pipeline, golden_dir, case) -> None:
    """retake, repaint, extend, edit, audio2audio: source latents, final latents and waveform against
    the official run (golden/ext: 1e-5 * max(1, |ref|) for the encoder, 1e-4 for the chain)."""
    params, source = ext_request(golden_dir, case)
    ref = ext_tensors(golden_dir, case)
    captured = {}
    engines = dict(pipeline.engines)

    def spy(name):
        def run(batch):
            out = engines[name](batch)
            captured[name] = {**batch, **out}
            return out
        return run

    pipeline.engines.update({name: spy(name) for name in ("dcae_encoder", "dcae_decoder")})
    try:
        result = pipeline(params, source=source)
    finally:
        pipeline.engines.update(engines)
    if source is not None:
        src = captured["dcae_encoder"]["LATENTS"]
        key = "ref_latents" if params.task == "audio2audio" else "src_latents"
        assert _max_err(src, ref[key]) <= 1e-5 * max(1.0, ref[key].abs().max().item())
    assert _max_err(captured["dcae_decoder"]["LATENTS"], ref["final_latents"]) < 1e-4
    wav, _ = soundfile.read(golden_dir / "ext" / f"{case}.wav", dtype="float32", always_2d=True)
    assert result.waveforms.shape == (1, *wav.T.shape)
    err = _max_err(result.waveforms[0], wav.T)
    assert err < 1e-4, f"{case}: waveform max abs error {err:.2e}"
    assert result.seeds == params.actual_seeds
    assert len(result.retake_seeds) == 1  # drawn for a1, which gives none
    assert result.retake_seeds == params.retake_seeds or not params.retake_seeds
    # a source task lasts as long as its latents; the others as asked (their waveform is cut to whole frames)
    frames = ref["final_latents"].shape[-1]
    assert result.duration == (pytest.approx(frames * 512 * 8 / 44100) if source else params.audio_duration)
