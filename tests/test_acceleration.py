"""The gpu profile's speed-ups compute what the plain modules compute (checked on CPU, float32).

CUDA graphs and torch.compile themselves need a GPU; benchmarks/bench_pipeline.py checks them
there against float32. Here: the bucket padding around the decode, prepared conditions through the
shared row buffer, the windowed and channels-last vocoder, and the transformer sharing and pruning
at load.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from acestep_triton.acceleration import Acceleration, BucketedDecode, _RowBuffer
from acestep_triton.checkpoint import Checkpoint
from acestep_triton.components import load_component, load_components
from acestep_triton.condition_cache import condition_rows
from acestep_triton.models.transformer import ACEStepTransformer
from acestep_triton.models.vocoder import ADaMoSHiFiGAN
from acestep_triton.registry import component
from acestep_triton.specs import ERG_Q_SCALE


@pytest.fixture(scope="module")
def transformer(golden_ckpt: Path) -> ACEStepTransformer:
    torch.set_num_threads(2)
    return ACEStepTransformer.from_pretrained(golden_ckpt / "ace_step_transformer").eval()


@pytest.fixture(scope="module")
def vocoder(golden_ckpt: Path) -> ADaMoSHiFiGAN:
    return ADaMoSHiFiGAN.from_pretrained(golden_ckpt / "music_vocoder").eval()


def _decode_inputs(transformer: ACEStepTransformer, rows: int, frames: int, tokens: int):
    g = torch.Generator().manual_seed(rows * 1000 + frames)
    config = transformer.config
    return (
        torch.randn(rows, config.in_channels, config.max_height, frames, generator=g),
        torch.ones(rows, frames),
        torch.randn(rows, tokens, config.inner_dim, generator=g),
        torch.ones(rows, tokens),
        torch.linspace(900.0, 300.0, rows),
        torch.tensor([1.0, ERG_Q_SCALE, 1.0][:rows]),
    )


@pytest.mark.parametrize("rows", [1, 3])
@torch.no_grad()
def test_bucketed_decode_equals_plain_decode(transformer: ACEStepTransformer, rows: int) -> None:
    """Frames, tokens and rows padded up to their buckets (3 rows run as 4 here) change nothing."""
    settings = Acceleration(decode_graphs=False, frame_bucket=16, token_bucket=32, row_buckets=(1, 2, 4, 6))
    inputs = _decode_inputs(transformer, rows, frames=37, tokens=45)
    expected = transformer.decode(*inputs)
    actual = BucketedDecode(transformer, settings)(*inputs)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=1e-5 * max(1.0, expected.abs().max().item()))


def _conditions(transformer: ACEStepTransformer, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two branch rows of `tokens` condition tokens, the second with its last 3 masked."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, tokens)
    mask[1, -3:] = 0
    return torch.randn(2, tokens, transformer.config.inner_dim, generator=g), mask


@torch.no_grad()
def test_prepared_rows_through_the_shared_buffer_equal_the_plain_decode(transformer: ACEStepTransformer) -> None:
    """Any sequence of batches of prepared rows (a request's steps, requests mixed and reordered,
    different token buckets in one batch, more rows than one decode takes) decodes what
    transformer.decode does with the same conditions, whatever the buffer held before."""
    settings = Acceleration(decode_graphs=False, frame_bucket=16, token_bucket=32, row_buckets=(1, 2, 4),
                            max_decode_row_frames=4 * 48)
    bucketed = BucketedDecode(transformer, settings)
    sent = {"a": _conditions(transformer, 45, 1), "b": _conditions(transformer, 20, 2)}
    prepared = {name: bucketed.prepare(*conds) for name, conds in sent.items()}
    frames = 37  # padded to 48: 4 rows per decode
    for step, picks in enumerate([[("a", 0), ("a", 1)], [("a", 0), ("a", 1)], [("a", 0)], [("b", 0), ("a", 1)],
                                  [("a", 1), ("a", 0), ("b", 1)], [("b", 0), ("a", 0), ("b", 1), ("a", 1), ("a", 0)]]):
        latents, mask, _, _, timestep, _ = _decode_inputs(transformer, len(picks), frames, tokens=1)
        q_scale = torch.tensor([1.0, ERG_Q_SCALE] * 3)[: len(picks)]
        rows = [prepared[name][i] for name, i in picks]
        longest = max(sent[name][0].shape[1] for name, _ in picks)
        pads = [longest - sent[name][0].shape[1] for name, _ in picks]
        states = torch.stack([F.pad(sent[name][0][i], (0, 0, 0, pad)) for (name, i), pad in zip(picks, pads)])
        states_mask = torch.stack([F.pad(sent[name][1][i], (0, pad)) for (name, i), pad in zip(picks, pads)])
        expected = transformer.decode(latents, mask, states, states_mask, timestep, q_scale)
        actual = bucketed.decode_rows(latents, mask, rows, timestep, q_scale)
        assert actual.shape == expected.shape, step
        torch.testing.assert_close(actual, expected, rtol=0.0, atol=1e-5 * max(1.0, expected.abs().max().item()))


def test_row_buffer_copies_a_row_only_when_another_one_was_there() -> None:
    rows = condition_rows(torch.randn(3, 2, 5, 4), torch.zeros(3, 5))
    buffer = _RowBuffer(4, 8, rows[0])
    buffer.load(rows[:2], 2)
    buffer.keys_values[0].fill_(7.0)  # a marker: overwritten only if row 0 is copied again
    keys_values, bias = buffer.load(rows[:2], 4)
    assert keys_values.shape == (4, 2, 8, 4) and bool((keys_values[0] == 7.0).all())
    keys_values, bias = buffer.load([rows[2], rows[0]], 2)
    assert torch.equal(keys_values[0, :, :5], rows[2].tokens) and torch.equal(keys_values[1, :, :5], rows[0].tokens)
    assert keys_values[:, :, 5:].abs().sum() == 0 and bias[:, :5].abs().sum() == 0
    assert bool(torch.isinf(bias[:, 5:]).all())


@pytest.mark.slow  # dozens of vocoder decodes
@torch.no_grad()
def test_windowed_vocoder_equals_whole_decode(vocoder: ADaMoSHiFiGAN) -> None:
    """Windows overlapping by the receptive field give the whole decode, up to float32 rounding."""
    mel = torch.randn(2, vocoder.config.n_mels, 500, generator=torch.Generator().manual_seed(0)) - 5.0
    whole = vocoder.decode(mel)
    context = vocoder.context_frames()
    # the smallest window keeps a centre of 8 frames (63 windows): every window boundary is checked
    # without the 500 single-frame windows that took minutes
    for window in (2 * context + 8, 200, 333, 500):
        windowed = vocoder.decode_windowed(mel, window)
        assert windowed.shape == whole.shape
        torch.testing.assert_close(windowed, whole, rtol=0.0, atol=1e-5)


@torch.no_grad()
def test_vocoder_context_is_needed(vocoder: ADaMoSHiFiGAN) -> None:
    """A much smaller overlap than `context_frames()` does change the output: the bound is not vacuous."""
    mel = torch.randn(2, vocoder.config.n_mels, 400, generator=torch.Generator().manual_seed(1)) - 5.0
    whole = vocoder.decode(mel)
    short = ADaMoSHiFiGAN.from_config(vocoder.config).eval()
    short.load_state_dict(vocoder.state_dict())
    short.context_frames = lambda: vocoder.context_frames() // 4
    assert (short.decode_windowed(mel, 120) - whole).abs().max() > 1e-3


def test_windowed_vocoder_rejects_windows_without_a_centre(vocoder: ADaMoSHiFiGAN) -> None:
    with pytest.raises(ValueError, match="window_frames"):
        vocoder.decode_windowed(torch.zeros(1, vocoder.config.n_mels, 10), 2 * vocoder.context_frames())


@torch.no_grad()
def test_channels_last_head_equals_default_layout(vocoder: ADaMoSHiFiGAN) -> None:
    mel = torch.randn(2, vocoder.config.n_mels, 64, generator=torch.Generator().manual_seed(2)) - 5.0
    expected = vocoder.decode(mel)
    vocoder.head.channels_last = True
    try:
        actual = vocoder.decode(mel)
    finally:
        vocoder.head.channels_last = False
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=1e-5)


def test_transformer_components_share_one_pruned_transformer(golden_ckpt: Path) -> None:
    ckpt = Checkpoint(golden_ckpt)
    modules = load_components(["condition_encoder", "dit_step"], ckpt)
    transformer = modules["dit_step"].transformer
    assert modules["condition_encoder"].transformer is transformer
    kept = set(component("condition_encoder").parts) | set(component("dit_step").parts)
    present = {name for name, child in transformer.named_children() if child is not None}
    assert present == kept  # the training-only `projectors` are gone

    alone = load_component("dit_step", ckpt).transformer
    assert alone.lyric_encoder is None and alone.transformer_blocks is not None
