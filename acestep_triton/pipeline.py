"""The in-process text2music pipeline: the reference the Triton ensemble is checked against.

Stages are the ensemble's (contract.STAGES) and call the same code the Triton models call:
prepare_request -> text_encoder -> condition_encoder -> denoise(dit_step) -> dcae_decoder -> vocoder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from acestep_triton.checkpoint import Checkpoint, find_lyric_vocab, validate_checkpoint
from acestep_triton.contract import OUTPUT_SAMPLE_RATE, GenerationParams
from acestep_triton.engines import load_engines
from acestep_triton.lyrics import LyricTokenizer
from acestep_triton.preprocess import PreparedRequest, prepare_request
from acestep_triton.sampling.loop import ProgressFn, denoise
from acestep_triton.sampling.seeds import initial_noise, make_generators
from acestep_triton.specs import ERG_Q_SCALE, NEURAL_COMPONENTS
from acestep_triton.text_tokenizer import TextTokenizer

Engine = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Conditions:
    """Encoder states per guidance branch: states [K, L, D], mask [K, L], row k is branches[k]."""

    branches: tuple[str, ...]
    states: torch.Tensor
    mask: torch.Tensor


def branch_inputs(
    conditions: Conditions, branches: Sequence[str], items: int, frames: int, use_erg_diffusion: bool
) -> dict[str, torch.Tensor]:
    """The `dit_step` inputs that depend only on the branches of a step (rows branch-major,
    N = len(branches) * items), on the conditions' device: the same for every step with these branches.

    ERG-diffusion weakens only the "null" rows, as upstream's hooks do on the uncond pass.
    """
    device = conditions.states.device
    rows = torch.tensor([conditions.branches.index(b) for b in branches]).repeat_interleave(items)
    q_scale = torch.tensor(
        [ERG_Q_SCALE if (b == "null" and use_erg_diffusion) else 1.0 for b in branches]
    ).repeat_interleave(items)
    rows = rows.to(device)
    return {
        "ATTENTION_MASK": torch.ones(rows.shape[0], frames, device=device),
        "ENCODER_STATES": conditions.states[rows],
        "ENCODER_MASK": conditions.mask[rows],
        "Q_SCALE": q_scale.reshape(-1, 1).to(device),
    }


def dit_inputs(
    conditions: Conditions,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    branches: Sequence[str],
    use_erg_diffusion: bool,
) -> dict[str, torch.Tensor]:
    """The `dit_step` batch for one loop step (see sampling.loop: rows branch-major, N = len(branches)*B)."""
    items = latents.shape[0] // len(branches)
    batch = branch_inputs(conditions, branches, items, latents.shape[-1], use_erg_diffusion)
    batch["ATTENTION_MASK"] = batch["ATTENTION_MASK"].to(latents)
    batch["Q_SCALE"] = batch["Q_SCALE"].to(latents)
    return {"LATENTS": latents, "TIMESTEP": timestep.reshape(-1, 1).to(latents.dtype), **batch}


def text_encoder_inputs(prepared: PreparedRequest) -> dict[str, torch.Tensor]:
    return {
        "TEXT_IDS": torch.from_numpy(prepared.text_ids),
        "TEXT_MASK": torch.from_numpy(prepared.text_mask),
        "TEXT_Q_SCALE": torch.from_numpy(prepared.text_q_scale),
    }


def condition_encoder_inputs(prepared: PreparedRequest, text_states: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "TEXT_STATES": text_states,
        "TEXT_MASK": torch.from_numpy(prepared.text_mask),
        "TEXT_SCALE": torch.from_numpy(prepared.text_scale),
        "LYRIC_IDS": torch.from_numpy(prepared.lyric_ids),
        "LYRIC_MASK": torch.from_numpy(prepared.lyric_mask),
        "LYRIC_Q_SCALE": torch.from_numpy(prepared.lyric_q_scale),
    }


@dataclass
class GenerationResult:
    """waveforms [B, 2, N] float32 at `sample_rate`; one item per seed."""

    waveforms: torch.Tensor
    seeds: tuple[int, ...]
    duration: float
    timings: dict[str, float] = field(default_factory=dict)
    sample_rate: int = OUTPUT_SAMPLE_RATE


class Text2MusicPipeline:
    """Prompt + lyrics + parameters -> 48 kHz stereo waveforms, with per-stage timings."""

    def __init__(self, text_tokenizer: TextTokenizer, lyric_tokenizer: LyricTokenizer,
                 engines: Mapping[str, Engine], device: torch.device) -> None:
        missing = set(NEURAL_COMPONENTS) - set(engines)
        if missing:
            raise ValueError(f"engines missing for {sorted(missing)}")
        self.text_tokenizer = text_tokenizer
        self.lyric_tokenizer = lyric_tokenizer
        self.engines = dict(engines)
        self.device = device

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike | Checkpoint,
        lyric_vocab: str | os.PathLike | None = None,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        accelerate: bool = False,
    ) -> Text2MusicPipeline:
        """Load every component (one shared transformer); `accelerate` applies the gpu profile's
        speed-ups (CUDA only, see acestep_triton.acceleration)."""
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else validate_checkpoint(checkpoint)
        engines = {name: engine.run
                   for name, engine in load_engines(NEURAL_COMPONENTS, ckpt, device, dtype, accelerate).items()}
        return cls(
            TextTokenizer.from_pretrained(ckpt.text_encoder),
            LyricTokenizer.from_file(find_lyric_vocab(ckpt, lyric_vocab)),
            engines,
            torch.device(device),
        )

    def prepare(self, params: GenerationParams) -> PreparedRequest:
        return prepare_request(params, self.text_tokenizer.tokenize_one, self.lyric_tokenizer.tokenize)

    def __call__(self, params: GenerationParams, callback: ProgressFn | None = None) -> GenerationResult:
        timings: dict[str, float] = {}

        @contextmanager
        def stage(name: str):
            start = time.perf_counter()
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            timings[name] = time.perf_counter() - start

        with stage("preprocess"):
            prepared = self.prepare(params)
        with stage("text_encoder"):
            text_states = self.engines["text_encoder"](text_encoder_inputs(prepared))["TEXT_STATES"]
        with stage("condition_encoder"):
            out = self.engines["condition_encoder"](condition_encoder_inputs(prepared, text_states))
            conditions = Conditions(prepared.branches, out["ENCODER_STATES"].to(self.device),
                                    out["ENCODER_MASK"].to(self.device))
        with stage("diffusion"):
            generators = make_generators(prepared.seeds)
            noise = initial_noise(generators, prepared.frames, device=self.device)

            per_branches: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

            def step_fn(latents, timestep, branches):
                key = tuple(branches)
                if key not in per_branches:
                    per_branches[key] = branch_inputs(conditions, key, noise.shape[0], noise.shape[-1],
                                                      params.use_erg_diffusion)
                batch = {"LATENTS": latents, "TIMESTEP": timestep.reshape(-1, 1), **per_branches[key]}
                return self.engines["dit_step"](batch)["VELOCITY"].to(latents)

            latents = denoise(step_fn, params, noise, generators, callback)
        with stage("dcae_decoder"):
            mel = self.engines["dcae_decoder"]({"LATENTS": latents})["MEL"]
        with stage("vocoder"):
            waveforms = self.engines["vocoder"]({"MEL": mel})["WAVEFORM"].float().cpu()
        return GenerationResult(waveforms, prepared.seeds, prepared.duration, timings)
