"""Output formats: what a request may ask for, checked once, and encoding through libsndfile (soundfile).

Only choices libsndfile honours are offered (soundfile >= 0.13 passes `compression_level` and
`bitrate_mode` through to libsndfile >= 1.2):

- wav: 16-bit PCM, 24-bit PCM or 32-bit float (the contract's default).
- flac: 16- or 24-bit, FLAC compression level 0-8 (libsndfile's level in [0, 1] times 8; lossless,
  only size and encoding time change).
- ogg (Vorbis) and opus (Opus in an Ogg container, 48 kHz native): `quality` in [0, 1] (default
  0.5), libsndfile's compression level 1 - quality (Vorbis quality; Opus bitrate).
- mp3 (MPEG-1 Layer III through LAME): `quality` in (0, 1] (default 0.5; libsndfile refuses level 1.0) and
  `bitrate_mode` constant, average or variable; with constant, quality picks the bitrate
  (1.0: 320 kbit/s).

libsndfile has no bitrate in kbit/s and Vorbis/Opus accept no bitrate mode there (Opus refuses one,
Vorbis ignores it), so neither is offered.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile

from acestep_triton.contract import ParameterError

BITRATE_MODES = ("constant", "average", "variable")
# The lossy formats' quality when a request names none: one documented value for all three rather
# than libsndfile's per-codec defaults (its Opus default measured under 20 dB SNR on a plain mix of
# harmonics; 0.5 gives Vorbis ~190, Opus ~270, MP3 VBR ~130 kbit/s stereo, each above 23 dB there).
DEFAULT_QUALITY = 0.5
FLAC_LEVELS = range(0, 9)


@dataclass(frozen=True)
class AudioFormat:
    """One `format` value: its file suffix, media type and what libsndfile writes for it."""

    name: str
    suffix: str
    media_type: str
    container: str  # soundfile format
    subtypes: dict[int, str]  # bit_depth -> soundfile subtype; one entry (key 0) for codecs without a depth
    default_bit_depth: int
    lossy: bool
    quality_min_exclusive: bool = False  # mp3: libsndfile refuses compression level 1.0 (quality 0)
    bitrate_modes: tuple[str, ...] = ()
    compression_levels: range | None = None

    @property
    def lossless(self) -> bool:
        return not self.lossy


FORMATS: dict[str, AudioFormat] = {
    f.name: f
    for f in (
        AudioFormat("wav", ".wav", "audio/wav", "WAV", {16: "PCM_16", 24: "PCM_24", 32: "FLOAT"}, 32, lossy=False),
        AudioFormat(
            "flac", ".flac", "audio/flac", "FLAC", {16: "PCM_16", 24: "PCM_24"}, 24, lossy=False,
            compression_levels=FLAC_LEVELS,
        ),
        AudioFormat("ogg", ".ogg", "audio/ogg", "OGG", {0: "VORBIS"}, 0, lossy=True),
        AudioFormat("opus", ".opus", "audio/ogg", "OGG", {0: "OPUS"}, 0, lossy=True),
        AudioFormat(
            "mp3", ".mp3", "audio/mpeg", "MP3", {0: "MPEG_LAYER_III"}, 0, lossy=True,
            quality_min_exclusive=True, bitrate_modes=BITRATE_MODES,
        ),
    )
}
FORMAT_NAMES = tuple(FORMATS)
AUDIO_MEDIA_TYPES = tuple(dict.fromkeys(f.media_type for f in FORMATS.values()))
MEDIA_TYPES = {f.suffix: f.media_type for f in FORMATS.values()} | {".json": "application/json"}


@dataclass(frozen=True)
class Encoding:
    """A checked choice of format and its options (None: not applicable, or libsndfile's default for
    the FLAC compression level and the MP3 bitrate mode)."""

    format: AudioFormat
    bit_depth: int
    compression_level: int | None = None
    quality: float | None = None
    bitrate_mode: str | None = None

    @property
    def subtype(self) -> str:
        return self.format.subtypes[self.bit_depth]

    def record(self) -> dict[str, object]:
        """What the sidecar records: the request's choices resolved, plus libsndfile's names."""
        return {
            "format": self.format.name,
            "media_type": self.format.media_type,
            "container": self.format.container,
            "subtype": self.subtype,
            "bit_depth": self.bit_depth or None,
            "compression_level": self.compression_level,
            "quality": self.quality,
            "bitrate_mode": self.bitrate_mode,
        }

    def encode(self, waveform: np.ndarray, sample_rate: int) -> bytes:
        """The encoded file for waveform [channels, samples] float32.

        Integer PCM is clipped to [-1, 1] first: libsndfile converts float to integer without
        clipping unless asked (SFC_SET_CLIPPING, which soundfile does not expose), so a peak above
        full scale would wrap around.
        """
        if waveform.ndim != 2:
            raise ValueError(f"waveform must be [channels, samples], got shape {waveform.shape}")
        data = waveform.T.astype(np.float32)
        if self.subtype.startswith("PCM"):
            data = np.clip(data, -1.0, 1.0)
        options: dict[str, object] = {}
        if self.compression_level is not None:
            options["compression_level"] = self.compression_level / FLAC_LEVELS[-1]
        if self.quality is not None:
            options["compression_level"] = 1.0 - self.quality
        if self.bitrate_mode is not None:
            options["bitrate_mode"] = self.bitrate_mode.upper()
        buffer = io.BytesIO()
        with soundfile.SoundFile(buffer, "w", sample_rate, data.shape[1], self.subtype, format=self.format.container,
                                 **options) as file:
            if self.format.container == "WAV":
                _omit_peak_chunk(file)
            file.write(data)
        return buffer.getvalue()

    def wav_header(self, frames: int, channels: int, sample_rate: int) -> bytes:
        """The bytes of a WAV file of `frames` frames before its first sample: they do not depend on the
        samples (no PEAK chunk), so a stream can send them before the audio exists."""
        silence = self.encode(np.zeros((channels, frames), dtype=np.float32), sample_rate)
        return silence[: len(silence) - frames * channels * self._sample_bytes()]

    def wav_samples(self, waveform: np.ndarray, sample_rate: int) -> bytes:
        """The sample bytes `encode` writes for waveform [channels, n] (a WAV's data, header left out):
        the conversion is per sample, so the pieces of a waveform put together are its file's data."""
        encoded = self.encode(waveform, sample_rate)
        return encoded[len(encoded) - waveform.size * self._sample_bytes():]

    def _sample_bytes(self) -> int:
        if self.format.container != "WAV":
            raise ValueError(f"{self.format.name} is not WAV: its bytes are not laid out sample by sample")
        return self.bit_depth // 8


# libsndfile's command that turns off the PEAK chunk of float WAVs (sndfile.h SFC_SET_ADD_PEAK_CHUNK).
SFC_SET_ADD_PEAK_CHUNK = 0x1050


def _omit_peak_chunk(file: soundfile.SoundFile) -> None:
    """Write no PEAK chunk in a float WAV (libsndfile puts an equal-sized PAD chunk there instead).

    PEAK holds the whole signal's peaks and the time of writing, so the header of a float WAV would
    depend on its last sample and on the clock: no stream could send it first, and two writes of one
    waveform would differ. soundfile exposes no switch for it, so libsndfile's own command is sent
    through soundfile's handle of the open file.
    """
    soundfile._snd.sf_command(file._file, SFC_SET_ADD_PEAK_CHUNK, soundfile._ffi.NULL, 0)


def choose_encoding(
    format: str = "wav",
    bit_depth: int | None = None,
    compression_level: int | None = None,
    quality: float | None = None,
    bitrate_mode: str | None = None,
) -> Encoding:
    """The Encoding for a request's fields, or ParameterError naming the first field that does not fit."""
    if format not in FORMATS:
        raise ParameterError("format", f"must be one of {list(FORMAT_NAMES)}, got {format!r}")
    chosen = FORMATS[format]
    if bit_depth is not None:
        depths = [d for d in chosen.subtypes if d]
        if not depths:
            raise ParameterError("bit_depth", f"only for wav and flac, not {format}")
        if bit_depth not in depths:
            raise ParameterError("bit_depth", f"must be one of {depths} for {format}, got {bit_depth}")
    if compression_level is not None:
        if chosen.compression_levels is None:
            raise ParameterError("compression_level", f"only for flac, not {format}")
        if compression_level not in chosen.compression_levels:
            raise ParameterError("compression_level", f"must be in [0, 8] for flac, got {compression_level}")
    if quality is not None:
        if not chosen.lossy:
            raise ParameterError("quality", f"only for lossy formats (ogg, opus, mp3), not {format} (lossless)")
        if not (0.0 < quality <= 1.0 if chosen.quality_min_exclusive else 0.0 <= quality <= 1.0):
            interval = "(0, 1]" if chosen.quality_min_exclusive else "[0, 1]"
            raise ParameterError("quality", f"must be in {interval} for {format}, got {quality}")
    if bitrate_mode is not None:
        if not chosen.bitrate_modes:
            raise ParameterError("bitrate_mode", f"only for mp3, not {format}")
        if bitrate_mode not in chosen.bitrate_modes:
            raise ParameterError("bitrate_mode", f"must be one of {list(chosen.bitrate_modes)}, got {bitrate_mode!r}")
    if quality is None and chosen.lossy:
        quality = DEFAULT_QUALITY
    return Encoding(chosen, chosen.default_bit_depth if bit_depth is None else bit_depth, compression_level, quality,
                    bitrate_mode)
