"""Golden cases of the official implementation (../shared/golden) as our request type."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile
import torch
from safetensors.torch import load_file

from acestep_triton.contract import AUDIO2AUDIO, TASK_FIELDS, TEXT2MUSIC, GenerationParams, SourceAudio

# The golden cases every parity test runs (golden/README.md describes them).
GOLDEN_CASES = ("a_euler_apg_erg", "b_heun_cfg_noerg", "e_empty_lyrics")


def _seeds(manual_seeds) -> tuple[int, ...]:
    if isinstance(manual_seeds, int):
        return (manual_seeds,)
    if isinstance(manual_seeds, str):
        return tuple(int(s) for s in manual_seeds.split(","))
    return tuple(int(s) for s in manual_seeds)


def golden_params(golden_dir: Path, case: str) -> GenerationParams:
    """The case's `call_kwargs` as a contract request."""
    kw = dict(json.loads((golden_dir / f"{case}.json").read_text())["call_kwargs"])
    kw["actual_seeds"] = _seeds(kw.pop("manual_seeds"))
    kw["oss_steps"] = tuple(kw.get("oss_steps") or ())
    return GenerationParams(**kw)


def golden_tensors(golden_dir: Path, case: str) -> dict[str, torch.Tensor]:
    return load_file(str(golden_dir / f"{case}.safetensors"))


# The public extension cases of the other tasks (golden/ext/README.md), LoRA aside.
EXT_CASES = ("r1_retake_v02", "p1_repaint", "x1_extend_left", "ed1_edit_navg1", "a1_audio2audio_s05")
SOURCE_WAV = "src_chords_48k_stereo.wav"


def ext_request(golden_dir: Path, case: str) -> tuple[GenerationParams, SourceAudio | None]:
    """An extension case's `call_kwargs` as a contract request and its source audio.

    Upstream's audio2audio_enable + ref_audio_input is task "audio2audio"; the audio paths become
    the source WAV's samples; seeds a task does not read (a1's retake_seeds) are left out, as the
    contract refuses them.
    """
    kw = dict(json.loads((golden_dir / "ext" / f"{case}.json").read_text())["call_kwargs"])
    kw["actual_seeds"] = _seeds(kw.pop("manual_seeds"))
    kw["retake_seeds"] = _seeds(kw.pop("retake_seeds"))
    kw["oss_steps"] = tuple(kw.get("oss_steps") or ())
    audio_path = kw.pop("src_audio_path", None) or kw.pop("ref_audio_input", None)
    if kw.pop("audio2audio_enable", False):
        kw["task"] = AUDIO2AUDIO
    params = GenerationParams(**{k: v for k, v in kw.items() if k != "retake_seeds" or
                                 "retake_seeds" in TASK_FIELDS[kw.get("task", TEXT2MUSIC)]})
    if audio_path is None:
        return params, None
    samples, sample_rate = soundfile.read(golden_dir / "ext" / Path(audio_path).name, dtype="float32",
                                          always_2d=True)
    return params, SourceAudio(np.ascontiguousarray(samples.T), sample_rate)


def ext_tensors(golden_dir: Path, case: str) -> dict[str, torch.Tensor]:
    """The case's stored tensors, every alias (JSON `aliases`) resolved to its stored twin."""
    tensors = load_file(str(golden_dir / "ext" / f"{case}.safetensors"))
    aliases = json.loads((golden_dir / "ext" / f"{case}.json").read_text()).get("aliases", {})
    return {**tensors, **{alias: tensors[stored] for alias, stored in aliases.items() if stored in tensors}}
