"""A running job's audio as it is decoded, for `GET /jobs/{id}/audio`.

The engine hands over the vocoder's chunks in order (Progress.audio); each becomes the WAV sample
bytes the job's file will hold at that place (formats.Encoding.wav_samples), behind the header of
the whole file, which is known from the first chunk on (formats.Encoding.wav_header). A reader
gets those bytes as they arrive and, once the job has written its file, the rest from the file:
the bytes streamed are the file's bytes.
"""

from __future__ import annotations

import asyncio

import numpy as np

from gateway.formats import Encoding


class AudioStream:
    """The bytes of each item's WAV file known so far, in order, and a wake-up for readers."""

    def __init__(self, encoding: Encoding, sample_rate: int) -> None:
        self.encoding = encoding
        self.sample_rate = sample_rate
        self.items: list[bytearray] = []
        self.samples_done = 0
        self.closed = False
        self._changed = asyncio.Event()

    def feed(self, audio: np.ndarray, offset: int, total: int) -> None:
        """Take the chunk audio [items, channels, n] that starts at sample `offset` of `total`."""
        if offset != self.samples_done:
            raise ValueError(f"audio chunk at sample {offset}, expected {self.samples_done}")
        if not self.items:
            header = self.encoding.wav_header(total, audio.shape[1], self.sample_rate)
            self.items = [bytearray(header) for _ in range(audio.shape[0])]
        for item, wave in zip(self.items, audio):
            item += self.encoding.wav_samples(wave, self.sample_rate)
        self.samples_done += audio.shape[-1]
        self._notify()

    def close(self) -> None:
        """No more chunks will come (the job ended, or its file is written)."""
        self.closed = True
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def read(self, item: int, start: int) -> bytes:
        """The item's bytes from `start` on that are known now, waiting for more if there are none yet;
        b"" once the stream is closed and everything known was read."""
        while True:
            changed = self._changed
            known = self.items[item] if item < len(self.items) else b""
            if start < len(known):
                return bytes(known[start:])
            if self.closed:
                return b""
            await changed.wait()
