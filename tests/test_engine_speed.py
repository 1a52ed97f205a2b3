"""The engine speed work (issue 10) computes what the plain engine computes (CPU, float32).

Cross-attention keys/values prepared once per request and decoded from, and N items in one
pipeline call against their solo runs. The GPU side (graphs, bf16) is checked by
benchmarks/bench_pipeline.py against float32 and against solo runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from acestep_triton.acceleration import Acceleration, BucketedDecode
from acestep_triton.contract import GenerationParams
from acestep_triton.models.transformer import ACEStepTransformer
from acestep_triton.pipeline import Text2MusicPipeline
from acestep_triton.specs import ERG_Q_SCALE


@pytest.fixture(scope="module")
def transformer(golden_ckpt: Path) -> ACEStepTransformer:
    torch.set_num_threads(2)
    return ACEStepTransformer.from_pretrained(golden_ckpt / "ace_step_transformer").eval()


def _inputs(transformer: ACEStepTransformer, rows: int, frames: int, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    config = transformer.config
    encoder_mask = torch.ones(rows, tokens)
    encoder_mask[-1, tokens // 2 :] = 0  # one row with padded conditions
    return (
        torch.randn(rows, config.in_channels, config.max_height, frames, generator=g),
        torch.ones(rows, frames),
        torch.randn(rows, tokens, config.inner_dim, generator=g),
        encoder_mask,
        torch.linspace(900.0, 300.0, rows),
        torch.tensor([1.0, ERG_Q_SCALE, 1.0][:rows]),
    )


def _relative(actual, expected) -> float:
    """Relative L2 error of tensors or arrays (pipeline waveforms are numpy)."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return float((actual - expected).norm() / expected.norm())


@torch.no_grad()
def test_prepared_cross_attention_equals_decode(transformer: ACEStepTransformer) -> None:
    """K/V prepared once for the distinct conditions, indexed per row, give the plain decode."""
    latents, frame_mask, states, mask, timestep, q_scale = _inputs(transformer, 3, frames=29, tokens=21)
    expected = transformer.decode(latents, frame_mask, states, mask, timestep, q_scale)
    keys_values, bias = transformer.prepare_cross_attention(states, mask)
    assert keys_values.shape == (3, len(transformer.transformer_blocks), 2, transformer.config.num_attention_heads,
                                 21, transformer.config.attention_head_dim)
    assert bias.shape == (3, 21) and torch.isinf(bias[-1, 11:]).all() and (bias[:, :10] == 0).all()
    actual = transformer.decode_prepared(latents, frame_mask, keys_values, bias, timestep, q_scale)
    assert _relative(actual, expected) < 1e-6
    # rows taken from prepared conditions by index: the way a sampler reuses them per branch
    order = torch.tensor([2, 0, 0])
    reused = transformer.decode_prepared(latents, frame_mask, keys_values[order], bias[order], timestep, q_scale)
    direct = transformer.decode(latents, frame_mask, states[order], mask[order], timestep, q_scale)
    assert _relative(reused, direct) < 1e-6


@torch.no_grad()
def test_spec_decode_follows_every_change_of_conditions(transformer: ACEStepTransformer) -> None:
    """BucketedDecode's spec path (a direct client's conditions, same shapes every call) never
    decodes with an earlier call's keys/values, although every call goes through the shared buffer."""
    decode = BucketedDecode(transformer, Acceleration(decode_graphs=False, row_buckets=(1, 2, 4)))
    first = _inputs(transformer, 2, frames=20, tokens=9, seed=1)
    other = _inputs(transformer, 2, frames=20, tokens=9, seed=2)
    for inputs in (first, first, other, first):
        expected = transformer.decode(*inputs)
        assert _relative(decode(*inputs), expected) < 1e-6
    changed_mask = list(first)
    changed_mask[3] = first[3].clone()
    changed_mask[3][0, -3:] = 0
    assert _relative(decode(*changed_mask), transformer.decode(*changed_mask)) < 1e-6


@pytest.mark.parametrize("window_batch", [None, 3])
@torch.no_grad()
def test_vocoder_windows_of_all_items_equal_solo_whole_decodes(golden_ckpt: Path, window_batch: int | None) -> None:
    """The windows of every item and channel decoded together (groups padded to one shape) give
    each item's own whole-signal decode."""
    from acestep_triton.components import VocoderComponent
    from acestep_triton.models.vocoder import ADaMoSHiFiGAN

    vocoder = ADaMoSHiFiGAN.from_pretrained(golden_ckpt / "music_vocoder").eval()
    mel = torch.randn(3, 2, vocoder.config.n_mels, 250, generator=torch.Generator().manual_seed(3)) - 5.0
    batched = VocoderComponent(vocoder, window_frames=2 * vocoder.context_frames() + 40, window_batch=window_batch)
    whole = VocoderComponent(vocoder)
    (together,) = batched(mel)
    for item in range(mel.shape[0]):
        (solo,) = whole(mel[item : item + 1])
        torch.testing.assert_close(together[item : item + 1], solo, rtol=0.0, atol=1e-5)


def test_items_in_one_call_equal_their_solo_runs(golden_ckpt: Path, lyric_vocab: Path) -> None:
    """N seeds in one pipeline call (every stage batched across items, guidance and ERG on) give
    each seed's solo waveform. One call has one duration; items of different lengths share a
    decode through frame masks (tests/test_transformer.py checks padded rows against solo rows)."""
    pipeline = Text2MusicPipeline.from_checkpoint(golden_ckpt, lyric_vocab)
    seeds = (11, 22, 33, 44)
    common = {"prompt": "synthwave, bass", "lyrics": "[verse]\nla la la", "audio_duration": 3.0, "infer_step": 5}
    together = pipeline(GenerationParams(actual_seeds=seeds, **common)).waveforms
    assert together.shape[0] == len(seeds)
    for index, seed in enumerate(seeds):
        solo = pipeline(GenerationParams(actual_seeds=(seed,), **common)).waveforms[0]
        assert _relative(together[index], solo) < 1e-4, f"item {index} (seed {seed})"


@torch.no_grad()
def test_windowed_dcae_equals_whole_decode(golden_ckpt: Path) -> None:
    """The DCAE's local part over windows (all items stacked, groups padded to one shape) gives the
    whole decode within the golden log-mel tolerance; a context below the receptive field does not,
    so `decoder_context_frames` is not vacuous."""
    from acestep_triton.models import dcae as dcae_module

    dcae = dcae_module.load_dcae(golden_ckpt / "music_dcae_f8c8")
    latents = torch.randn(2, 8, 16, 90, generator=torch.Generator().manual_seed(4))
    whole = dcae_module.latents_to_mel(dcae, latents)
    context = dcae_module.decoder_context_frames(dcae)
    for window, group in ((2 * context + 1, None), (37, 3), (90, None)):
        windowed = dcae_module.latents_to_mel_windowed(dcae, latents, window, window_batch=group)
        assert windowed.shape == whole.shape
        torch.testing.assert_close(windowed, whole, rtol=0.0, atol=5e-5)
    spans = dcae_module.overlapping_windows(90, 30, 1)
    hidden = dcae_module.decode_global_part(dcae, latents)
    short = torch.cat([dcae_module.decode_local_part(dcae, hidden[..., start : start + 30])[
        ..., (kept - start) * 8 : (keep_to - start) * 8] for start, kept, keep_to in spans], dim=-1)
    assert (short - whole).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["text_encoder", "condition_encoder"])
def test_encoder_warmup_batch_runs(golden_ckpt: Path, name: str) -> None:
    """The gpu profile warms the encoders up with spec-shaped inputs: they must be valid inputs."""
    from acestep_triton.acceleration import _encoder_warmup_batch
    from acestep_triton.checkpoint import validate_checkpoint
    from acestep_triton.engines import TorchEngine

    engine = TorchEngine.load(name, validate_checkpoint(golden_ckpt))
    outputs = engine.run(_encoder_warmup_batch(engine))
    assert all(out.shape[0] == 2 and torch.isfinite(out).all() for out in outputs.values())


_FUSED_CHECK = """
import torch
from acestep_triton.models import linear_attention_kernel as kernel
from acestep_triton.models.attention import LinearSelfAttention, rotary_cos_sin

torch.manual_seed(0)
rows, frames, heads, head_dim = 2, 150, 2, 16
attention = LinearSelfAttention(heads * head_dim, heads, head_dim).eval()
hidden = torch.randn(rows, frames, heads * head_dim)
frame_mask = torch.ones(rows, frames)
frame_mask[1, 120:] = 0
cos, sin = rotary_cos_sin(torch.arange(frames), head_dim, 1e6)
rotary = (cos[None, None], sin[None, None])
q_scale = torch.tensor([1.0, 0.01])
with torch.no_grad():
    expected = attention(hidden, frame_mask, rotary, q_scale)
    attention.fused = kernel.fused_linear_attention
    actual = attention(hidden, frame_mask, rotary, q_scale)
error = float((actual - expected).double().norm() / expected.double().norm())
print(error)
"""


def test_fused_linear_attention_kernel_equals_torch() -> None:
    """The Triton kernel, run by Triton's CPU interpreter in float32, gives LinearSelfAttention's
    output, with a padded row and a per-row query scale. In a subprocess: Triton reads
    TRITON_INTERPRET when it is first imported. Skipped where Triton is not installed (it is on
    the GPU image; `pip install triton` enables it on CPU)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _FUSED_CHECK], env=env, capture_output=True, text=True,
                          check=False, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) < 1e-5
