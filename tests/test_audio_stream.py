"""The vocoder stage in chunks (acestep_triton.audio_stream): the pieces tile the waveform and equal
one whole vocoder call, on the tiny checkpoint's vocoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from acestep_triton.audio_stream import alignment_frames, vocode_in_chunks
from acestep_triton.models.vocoder import aligned_chunks


def test_chunks_tile_the_signal_at_aligned_boundaries() -> None:
    for total, chunk, context, align in ((1000, 588, 70, 147), (147, 588, 70, 147), (5000, 100, 200, 147), (9, 4, 1, 1)):
        chunks = aligned_chunks(total, chunk, context, align)
        kept = [(keep_from, keep_to) for _, _, keep_from, keep_to in chunks]
        assert kept[0][0] == 0 and kept[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(kept, kept[1:]))
        for start, stop, keep_from, keep_to in chunks:
            assert start % align == 0 and (stop % align == 0 or stop == total) and keep_from % align == 0
            assert keep_from - start >= min(context, keep_from) and stop - keep_to >= min(context, total - keep_to)


def test_alignment_is_where_both_rates_meet() -> None:
    assert alignment_frames(512, 44100, 48000) == 147  # 147 frames * 512 samples = 75264 -> 81920 at 48 kHz
    assert alignment_frames(512, 48000, 48000) == 1


@pytest.mark.parametrize("frames", [100, 330])
@torch.no_grad()
def test_chunked_vocoding_equals_one_whole_call(golden_ckpt: Path, frames: int) -> None:
    from acestep_triton.components import VocoderComponent
    from acestep_triton.models.vocoder import ADaMoSHiFiGAN

    vocoder = ADaMoSHiFiGAN.from_pretrained(golden_ckpt / "music_vocoder").eval()
    component = VocoderComponent(vocoder)
    mel = torch.randn(2, 2, vocoder.config.n_mels, frames, generator=torch.Generator().manual_seed(5)) - 5.0
    (whole,) = component(mel)
    pieces, offsets = [], []
    for offset, piece, total in vocode_in_chunks(mel, lambda m: component(m)[0], vocoder.context_frames(), 147):
        assert total == whole.shape[-1]
        offsets.append(offset)
        pieces.append(piece)
    assert offsets == [sum(p.shape[-1] for p in pieces[:i]) for i in range(len(pieces))]
    assert len(pieces) == -(-frames // 147)
    torch.testing.assert_close(torch.cat(pieces, dim=-1), whole, rtol=0.0, atol=1e-5)
