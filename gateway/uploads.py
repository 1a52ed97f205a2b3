"""Source audio: uploads (POST /uploads) and the names `src_audio_path` / `ref_audio_input` take.

A task that starts from audio (contract.AUDIO_INPUT_TASKS) names it by the name of an upload or of
an earlier output, never by a server path: one safe path segment (gateway/outputs.py's rule), looked
up in the uploads directory, then in the outputs directory, each confined to its directory as
/download is. The gateway decodes the file (soundfile: whatever libsndfile reads, at its own sample
rate) and hands the engine a contract.SourceAudio; resampling and the mono-to-stereo copy are the
encoder's, as upstream's load_audio does them.

An upload is streamed into a hidden temp file of the uploads directory while its bytes are counted
(413 past `max_upload_bytes`, before anything is decoded), then decoded whole (so a file that only
starts like audio is refused too), checked (mono or stereo, not empty, at most `max_upload_s`), and
only then renamed to a generated name, `upload_<32 hex>.<libsndfile format>`. A refused upload
leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from acestep_triton.contract import ParameterError, SourceAudio
from gateway.errors import UploadTooLarge
from gateway.outputs import OutputStore, confined_file, find_file, is_safe_name

FILE_FIELD = "file"  # the multipart part that carries the audio
UPLOAD_PREFIX = "upload_"
# Room for the multipart framing (boundaries, part headers) on top of the file's own bytes, when a
# Content-Length is checked before the body is read.
_FRAMING_SLACK = 64 * 1024
_DECODE_BLOCK = 1 << 16


@dataclass(frozen=True)
class AudioFile:
    """What the gateway knows of a source file: libsndfile's format name, rate, channels, seconds."""

    name: str
    format: str
    sample_rate: int
    channels: int
    duration: float
    size: int
    modified_at: float

    def stand_in(self) -> SourceAudio:
        """A SourceAudio of this file's shape without its samples (a zero-stride view of one zero):
        what contract.validate_source reads, before the file is decoded."""
        frames = round(self.duration * self.sample_rate)
        return SourceAudio(np.broadcast_to(np.float32(0), (self.channels, frames)), self.sample_rate)


def _refusal(channels: int, frames: int, sample_rate: int, max_seconds: float) -> str | None:
    """Why audio of this shape cannot be a source, or None."""
    if channels not in (1, 2):
        return f"has {channels} channels; only mono or stereo audio is accepted"
    if frames == 0:
        return "has no samples"
    if frames > max_seconds * sample_rate:
        return f"is longer than {max_seconds:g} s"
    return None


def _decode(path: Path, max_seconds: float) -> tuple[str, int, int, int]:
    """Decode the whole file (block by block, stopping past `max_seconds`): (libsndfile's format name,
    sample rate, channels, frames). ParameterError naming FILE_FIELD when libsndfile cannot decode it
    or it cannot be a source."""
    try:
        with soundfile.SoundFile(path) as audio:
            shape = audio.format, audio.samplerate, audio.channels
            frames = 0
            if audio.channels in (1, 2):
                for block in audio.blocks(blocksize=_DECODE_BLOCK, dtype="float32", always_2d=True):
                    frames += block.shape[0]
                    if frames > max_seconds * audio.samplerate:
                        break
    except soundfile.SoundFileError:
        raise ParameterError(FILE_FIELD, "is not audio that libsndfile can decode (wav, flac, ogg, mp3, ...)") from None
    refusal = _refusal(shape[2], frames, shape[1], max_seconds)
    if refusal is not None:
        raise ParameterError(FILE_FIELD, refusal)
    return (*shape, frames)


class _MultipartFile:
    """python-multipart callbacks that write the one part named FILE_FIELD into `sink`, counting its
    bytes (UploadTooLarge past `max_bytes`); any other part is refused."""

    def __init__(self, boundary: bytes, sink: BinaryIO, max_bytes: int) -> None:
        self.sink = sink
        self.max_bytes = max_bytes
        self.size = 0
        self.parts = 0
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._field = bytearray()
        self._value = bytearray()
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._headers.clear,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_end": self._end,
        })

    def _header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("latin-1")
        if name != FILE_FIELD:
            raise ParameterError(FILE_FIELD, f"unexpected form field {name!r}: send one part named {FILE_FIELD!r}")
        self.parts += 1
        if self.parts > 1:
            raise ParameterError(FILE_FIELD, "one file per upload")

    def _data(self, data: bytes, start: int, end: int) -> None:
        self.size += end - start
        if self.size > self.max_bytes:
            raise UploadTooLarge(f"{FILE_FIELD}: larger than {self.max_bytes} bytes")
        self.sink.write(data[start:end])

    def _end(self) -> None:
        self.ended = True

    def write(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except MultipartParseError:
            raise ParameterError(FILE_FIELD, "malformed multipart/form-data body") from None

    def finish(self) -> None:
        self.parser.finalize()
        if self.parts == 0 or not self.ended:
            raise ParameterError(FILE_FIELD, f"missing or incomplete: send multipart/form-data with one part named "
                                             f"{FILE_FIELD!r} (curl -F {FILE_FIELD}=@song.wav)")
        if self.size == 0:
            raise ParameterError(FILE_FIELD, "is empty")


class UploadStore:
    """Owns the uploads directory: receives, lists and deletes uploads; every name is checked first."""

    def __init__(self, root: Path, max_bytes: int, max_seconds: float) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds

    async def receive(self, request: Request) -> AudioFile:
        """Store the request's multipart file as a new upload (module docstring); its description."""
        content_type, options = parse_options_header(request.headers.get("content-type", ""))
        if content_type != b"multipart/form-data" or not options.get(b"boundary"):
            raise ParameterError(FILE_FIELD, f"send multipart/form-data with one part named {FILE_FIELD!r}")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes + _FRAMING_SLACK:
            raise UploadTooLarge(f"{FILE_FIELD}: larger than {self.max_bytes} bytes")
        fd, temp_name = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".part")
        temp = Path(temp_name)
        try:
            with os.fdopen(fd, "wb") as sink:
                body = _MultipartFile(options[b"boundary"], sink, self.max_bytes)
                async for chunk in request.stream():
                    body.write(chunk)
                body.finish()
            return await asyncio.to_thread(self._admit, temp)
        finally:
            temp.unlink(missing_ok=True)

    def _admit(self, temp: Path) -> AudioFile:
        """Decode and check the received file, then give it its name (in a worker thread)."""
        file_format, rate, channels, frames = _decode(temp, self.max_seconds)
        name = f"{UPLOAD_PREFIX}{uuid.uuid4().hex}.{file_format.lower()}"
        os.replace(temp, self.root / name)
        stat = (self.root / name).stat()
        return AudioFile(name=name, format=file_format, sample_rate=rate, channels=channels, duration=frames / rate,
                         size=stat.st_size, modified_at=stat.st_mtime)

    def path(self, name: str) -> Path:
        """The upload `name` (OutputNotFound when there is none, ParameterError for an unsafe name)."""
        return find_file(self.root, name, "name", "uploads directory")

    def all(self) -> list[AudioFile]:
        """Every upload, newest first (files that vanish meanwhile are left out)."""
        found = []
        for path in self.root.iterdir():
            if path.name.startswith(".") or not path.is_file() or path.is_symlink():
                continue
            try:
                found.append(describe(path))
            except (OSError, soundfile.SoundFileError):
                continue
        return sorted(found, key=lambda f: f.modified_at, reverse=True)


def describe(path: Path) -> AudioFile:
    """A readable audio file's description from its header."""
    info = soundfile.info(str(path))
    stat = path.stat()
    return AudioFile(name=path.name, format=info.format, sample_rate=info.samplerate, channels=info.channels,
                     duration=info.frames / info.samplerate, size=stat.st_size, modified_at=stat.st_mtime)


class SourceFiles:
    """Where `src_audio_path` / `ref_audio_input` names lead: an upload, else an earlier output."""

    def __init__(self, uploads: UploadStore, outputs: OutputStore) -> None:
        self.uploads = uploads
        self.outputs = outputs

    def path(self, field: str, name: str) -> Path:
        """The file `name` names (ParameterError naming `field` for a path or an unknown name)."""
        if "/" in name or "\\" in name or ".." in name or os.path.isabs(name):
            raise ParameterError(field, "takes the name of an upload (POST /uploads) or of an earlier output, "
                                        "not a path")
        if not is_safe_name(name):
            raise ParameterError(field, f"{name!r} is not the name of an upload or output "
                                        "(letters, digits, '.', '_', '-'; no leading '.')")
        for root in (self.uploads.root, self.outputs.root):
            path = confined_file(root, name)
            if path is not None:
                return path
        raise ParameterError(field, f"no upload or output named {name!r}")

    def check(self, field: str, name: str) -> AudioFile:
        """The file `name` names, if libsndfile reads it as audio (its header is read, not the whole
        file); whether it fits the request is contract.validate_source's to say."""
        path = self.path(field, name)
        try:
            return describe(path)
        except soundfile.SoundFileError:
            raise ParameterError(field, f"{name!r} is not audio that libsndfile can read") from None

    def read(self, field: str, name: str) -> SourceAudio:
        """Decode the source (float32, channels first) for the engine; ParameterError naming `field` when
        it has gone since the request was accepted (removed by hand, or by another gateway)."""
        try:
            path = self.path(field, name)
            samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        except ParameterError:
            raise ParameterError(field, f"{name!r} was removed before the job ran") from None
        except soundfile.SoundFileError:
            raise ParameterError(field, f"{name!r} is no longer audio that libsndfile can read") from None
        return SourceAudio(np.ascontiguousarray(samples.T), int(rate))

