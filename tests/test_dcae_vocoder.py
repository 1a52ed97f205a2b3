"""DCAE, vocoder, resampling and WAV I/O against the official implementation's golden outputs."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import pytest
import soundfile
import torch
from diffusers import AutoencoderDC
from safetensors.torch import load_file

from acestep_triton.audio import read_audio, resample, resampled_length, sinc_resample_kernel, write_wav
from acestep_triton.checkpoint import DCAE_DIR, VOCODER_DIR
from acestep_triton.contract import OUTPUT_SAMPLE_RATE
from acestep_triton.models.dcae import (
    LATENT_SCALE,
    LATENT_SHIFT,
    MEL_MAX,
    MEL_MIN,
    AudioEncoder,
    encoder_audio,
    latents_to_mel,
    load_audio_encoder,
    load_dcae,
)
from acestep_triton.models.vocoder import ADaMoSHiFiGAN, load_vocoder
from tests.golden_cases import GOLDEN_CASES

STAGE_TOL = 1e-5  # teacher-forced stages: atol = STAGE_TOL * max(1, max|ref|)
BOOKKEEPING_TOL = 1e-6
CHAIN_WAVE_TOL = 1e-4
CHAIN_MEL_TOL = 5e-4


def assert_within(actual: torch.Tensor, ref: torch.Tensor, rel_tol: float) -> None:
    """|actual - ref| <= rel_tol * max(1, max|ref|) everywhere, shapes equal."""
    assert actual.shape == ref.shape
    torch.testing.assert_close(actual, ref, rtol=0.0, atol=rel_tol * max(1.0, ref.abs().max().item()))


@pytest.fixture(scope="module")
def vocoder(golden_ckpt: Path) -> ADaMoSHiFiGAN:
    return load_vocoder(golden_ckpt / VOCODER_DIR)


@pytest.fixture(scope="module")
def dcae(golden_ckpt: Path) -> AutoencoderDC:
    return load_dcae(golden_ckpt / DCAE_DIR)


@pytest.fixture(scope="module", params=GOLDEN_CASES)
def case(request: pytest.FixtureRequest, golden_dir: Path) -> dict:
    name = request.param
    return {
        "name": name,
        "tensors": load_file(golden_dir / f"{name}.safetensors"),
        "meta": json.loads((golden_dir / f"{name}.json").read_text()),
        "wav": golden_dir / f"{name}.wav",
    }


@pytest.fixture(scope="module")
def chain(case: dict, dcae: AutoencoderDC, vocoder: ADaMoSHiFiGAN) -> dict[str, torch.Tensor]:
    """The whole decode from the golden final latents: log-mel, 44.1 kHz wave, 48 kHz wave (item 0)."""
    mel = latents_to_mel(dcae, case["tensors"]["final_latents"])
    wave_44k = vocoder.decode_channels(mel)
    wave_48k = resample(wave_44k, vocoder.config.sampling_rate, OUTPUT_SAMPLE_RATE)
    return {"mel": mel[0], "wave_44k": wave_44k[0], "wave_48k": wave_48k[0]}


@pytest.mark.parametrize(
    ("folder", "model_class"), [(VOCODER_DIR, ADaMoSHiFiGAN), (DCAE_DIR, AutoencoderDC)]
)
def test_full_size_state_dict_matches_published(golden_dir: Path, folder: str, model_class: type) -> None:
    config = json.loads((golden_dir / "full-size-configs" / folder / "config.json").read_text())
    with torch.device("meta"):
        model = model_class.from_config(config)
    param_names = {name for name, _ in model.named_parameters()}
    ours = {
        name: (
            "x".join(map(str, t.shape)),
            str(t.dtype).removeprefix("torch."),
            "param" if name in param_names else "buffer",
        )
        for name, t in model.state_dict().items()
    }
    with open(golden_dir / "state_dict_full_size.tsv", newline="") as f:
        published = {
            row["name"]: (row["shape"], row["dtype"], row["kind"])
            for row in csv.DictReader(f, delimiter="\t")
            if row["component"] == folder
        }
    assert published, f"no rows for {folder}"
    assert sorted(set(ours) ^ set(published)) == []
    assert ours == published


def test_tiny_vocoder_loads_every_stored_tensor(golden_ckpt: Path, vocoder: ADaMoSHiFiGAN) -> None:
    stored = load_file(golden_ckpt / VOCODER_DIR / "diffusion_pytorch_model.safetensors")
    ours = vocoder.state_dict()
    assert set(ours) == set(stored)
    for name, tensor in stored.items():
        assert torch.equal(ours[name], tensor), name


def test_log_mel_buffers_rebuilt_from_config(vocoder: ADaMoSHiFiGAN) -> None:
    rebuilt = ADaMoSHiFiGAN.from_config(vocoder.config).mel_transform.state_dict()
    for name, stored in vocoder.mel_transform.state_dict().items():
        torch.testing.assert_close(rebuilt[name], stored, rtol=1e-6, atol=1e-7, msg=name)


def test_dcae_decoder_matches_golden(case: dict, dcae: AutoencoderDC) -> None:
    g = case["tensors"]
    with torch.no_grad():
        assert_within(dcae.decoder(g["dcae_decoder_input"]), g["dcae_decoder_output"], STAGE_TOL)


def test_latents_to_mel_matches_golden(case: dict, chain: dict) -> None:
    assert_within(chain["mel"], case["tensors"]["vocoder_input_mel"], STAGE_TOL)


def test_vocoder_matches_golden_head(case: dict, vocoder: ADaMoSHiFiGAN) -> None:
    g = case["tensors"]
    wave = vocoder.decode_channels(g["vocoder_input_mel"][None])[0]
    assert list(wave.shape) == case["meta"]["vocoder_output_44k_shape"]
    head = g["vocoder_output_44k_head"]
    assert_within(wave[:, : head.shape[-1]], head, STAGE_TOL)


def test_batched_channels_equal_per_channel_calls(golden_dir: Path, vocoder: ADaMoSHiFiGAN) -> None:
    mel = load_file(golden_dir / f"{GOLDEN_CASES[0]}.safetensors")["vocoder_input_mel"]
    per_channel = torch.cat([vocoder.decode(mel[c : c + 1]) for c in range(mel.shape[0])], dim=1)
    batched = vocoder.decode_channels(mel[None])
    assert batched.shape == (1, mel.shape[0], mel.shape[-1] * vocoder.config.hop_length)
    assert_within(batched, per_channel, STAGE_TOL)


def test_chain_matches_final_waveform_and_wav(case: dict, chain: dict) -> None:
    g = case["tensors"]
    assert_within(chain["mel"], g["vocoder_input_mel"], CHAIN_MEL_TOL)
    torch.testing.assert_close(chain["wave_48k"], g["final_waveform"], rtol=0.0, atol=CHAIN_WAVE_TOL)
    samples, sample_rate = read_audio(case["wav"])
    assert sample_rate == OUTPUT_SAMPLE_RATE
    assert soundfile.info(case["wav"]).subtype == "FLOAT"
    torch.testing.assert_close(samples, chain["wave_48k"], rtol=0.0, atol=CHAIN_WAVE_TOL)


def test_resample_of_vocoder_output_matches_golden(case: dict, chain: dict, vocoder: ADaMoSHiFiGAN) -> None:
    # Our 44.1 kHz output stands in for the unstored golden one (it matches the stored head);
    # resampling is a unit-gain filter, so the stage tolerance applies.
    resampled = resample(chain["wave_44k"], vocoder.config.sampling_rate, OUTPUT_SAMPLE_RATE)
    assert_within(resampled, case["tensors"]["final_waveform"], STAGE_TOL)


def test_resample_kernel_and_48k_to_44k_match_golden_encode(golden_dir: Path) -> None:
    meta = json.loads((golden_dir / "ext" / "enc1_48k_stereo.json").read_text())
    settings = meta["resampler"]
    kernel, width = sinc_resample_kernel(settings["orig_freq"], settings["new_freq"])
    assert list(kernel.shape) == settings["kernel"]["shape"] and width == settings["kernel_width"]
    assert hashlib.sha256(kernel.numpy().tobytes()).hexdigest() == settings["kernel"]["sha256"]
    audio, sample_rate = read_audio(golden_dir / "ext" / "src_chords_48k_stereo.wav")
    ref = load_file(golden_dir / "ext" / "enc1_48k_stereo.safetensors")["resampled_44k"]
    assert_within(resample(audio, sample_rate, settings["new_freq"]), ref[0], BOOKKEEPING_TOL)


@pytest.mark.parametrize(("orig_sr", "new_sr", "length"), [(44100, 48000, 44100 + 123), (48000, 44100, 9601)])
def test_resample_preserves_pure_tone(orig_sr: int, new_sr: int, length: int) -> None:
    freq = 1000.0
    t = torch.arange(length, dtype=torch.float64) / orig_sr
    out = resample(torch.sin(2 * math.pi * freq * t).float()[None], orig_sr, new_sr)[0]
    assert out.shape[-1] == math.ceil(length * new_sr / orig_sr) == resampled_length(length, orig_sr, new_sr)
    spectrum = torch.fft.rfft(out.double() * torch.hann_window(out.shape[-1], dtype=torch.float64))
    peak_hz = spectrum.abs().argmax().item() * new_sr / out.shape[-1]
    assert abs(peak_hz - freq) <= new_sr / out.shape[-1]
    expected = torch.sin(2 * math.pi * freq * torch.arange(out.shape[-1], dtype=torch.float64) / new_sr)
    edge = new_sr // 100  # the zero padding at both ends rings for a few ms
    torch.testing.assert_close(out[edge:-edge].double(), expected[edge:-edge], rtol=0.0, atol=2e-3)


def test_resample_same_rate_is_identity() -> None:
    wave = torch.randn(2, 100)
    assert resample(wave, 44100, 44100) is wave


@pytest.fixture(scope="module")
def audio_encoder(golden_ckpt: Path) -> AudioEncoder:
    return load_audio_encoder(golden_ckpt / DCAE_DIR)


def test_encode_matches_golden_stage_by_stage(golden_dir: Path, audio_encoder: AudioEncoder) -> None:
    """upstream's MusicDCAE.load_audio + encode on the 48 kHz stereo source, every stored stage."""
    ref = load_file(golden_dir / "ext" / "enc1_48k_stereo.safetensors")
    audio, sample_rate = read_audio(golden_dir / "ext" / "src_chords_48k_stereo.wav")
    resampled = encoder_audio(audio, sample_rate, 44100, 2)
    assert_within(resampled, ref["resampled_44k"], BOOKKEEPING_TOL)
    # The log amplifies float32 STFT rounding in quiet bins, and that rounding depends on the CPU's FFT
    # kernels: on an Intel host the reference's log-mel differs by 3.4e-4 from ours and by 4.0e-4 from
    # a float64 STFT (the reference's own error), so the log-mel gets the golden log-mel bound.
    mel = audio_encoder.mel(resampled)
    assert mel.shape == ref["mel"].shape  # zero-padded to whole latent frames: 264600 -> 266240 samples
    torch.testing.assert_close(mel, ref["mel"], rtol=0.0, atol=CHAIN_MEL_TOL)
    with torch.no_grad():
        encoded = audio_encoder.encoder(((ref["mel"] - MEL_MIN) / (MEL_MAX - MEL_MIN) - 0.5) / 0.5)
        latents = audio_encoder(resampled)
    assert_within(encoded, ref["dcae_encoder_output"], STAGE_TOL)
    assert_within(latents, ref["latents"], STAGE_TOL)
    assert_within((ref["dcae_encoder_output"] - LATENT_SHIFT) * LATENT_SCALE, ref["latents"], BOOKKEEPING_TOL)


def test_encode_duplicates_mono_and_skips_resampling_at_the_vocoder_rate(audio_encoder: AudioEncoder) -> None:
    mono = torch.randn(1, 3 * 4096 + 5, generator=torch.Generator().manual_seed(0)) * 0.3
    stereo = encoder_audio(mono, 44100, 44100, 2)
    assert torch.equal(stereo, mono.repeat(2, 1)[None])
    with torch.no_grad():
        assert audio_encoder(stereo).shape == (1, 8, 16, 4)  # a partial last frame still gives a latent frame


def test_encode_keeps_the_log_mel_in_float32_when_cast(golden_ckpt: Path, audio_encoder: AudioEncoder) -> None:
    """The gpu profile casts the component to bfloat16: the encoder follows, the log-mel does not
    (bfloat16's rounding of its filterbank moves quiet log-mel bins by whole units)."""
    cast = load_audio_encoder(golden_ckpt / DCAE_DIR).to(torch.bfloat16)
    audio = torch.randn(1, 2, 2 * 4096, generator=torch.Generator().manual_seed(1)) * 0.1
    with torch.no_grad():
        assert torch.equal(cast.mel(audio), audio_encoder.mel(audio))
        assert cast(audio).dtype == torch.bfloat16


def test_encode_rejects_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match="audio"):
        encoder_audio(torch.zeros(3, 4096), 44100, 44100, 2)


def test_write_wav_round_trips_float32(tmp_path: Path) -> None:
    wave = torch.rand(2, 4801) * 2 - 1
    path = tmp_path / "out.wav"
    path.write_bytes(b"stale")
    assert write_wav(path, wave, OUTPUT_SAMPLE_RATE) == path
    info = soundfile.info(path)
    assert (info.format, info.subtype, info.channels, info.samplerate) == ("WAV", "FLOAT", 2, OUTPUT_SAMPLE_RATE)
    samples, sample_rate = read_audio(path)
    assert sample_rate == OUTPUT_SAMPLE_RATE
    assert torch.equal(samples, wave)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]


def test_write_wav_rejects_unbatched_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="wave"):
        write_wav(tmp_path / "x.wav", torch.zeros(3, 2, 10), OUTPUT_SAMPLE_RATE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rates", [(48000, 44100), (44100, 48000), (22050, 44100), (8000, 44100)])
def test_resampled_length_agrees_with_the_torch_free_one(rates: tuple[int, int]) -> None:
    """audio.resampled_length (torch, symbolic in exported graphs) and geometry.resampled_length
    (torch-free, for the contract's source checks) are one formula, float32 rounding included."""
    from acestep_triton import geometry

    lengths = [1, 147, 4095, 288000, 10_000_003, 11_520_000, 11_999_999]
    assert [resampled_length(n, *rates) for n in lengths] == [geometry.resampled_length(n, *rates) for n in lengths]
