"""The in-process text2music pipeline: the reference the Triton ensemble is checked against.

Stages are the ensemble's (contract.STAGES) and call the same code the Triton models call:
prepare_request -> text_encoder -> condition_encoder -> denoise(dit_step) -> dcae_decoder -> vocoder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager

import torch

from acestep_triton.adapters import AdapterSettings
from acestep_triton.checkpoint import Checkpoint, find_lyric_vocab, validate_checkpoint
from acestep_triton.contract import GenerationParams, GenerationResult
from acestep_triton.engines import load_engines
from acestep_triton.geometry import PUBLISHED_GEOMETRY, LatentGeometry, latent_geometry
from acestep_triton.lora import AdapterStore, adapter_rows
from acestep_triton.lyrics import LyricTokenizer
from acestep_triton.preprocess import PreparedRequest, prepare_request
from acestep_triton.registry import NEURAL_COMPONENTS
from acestep_triton.sampling.conditions import Conditions, branch_inputs
from acestep_triton.sampling.loop import ProgressFn, denoise
from acestep_triton.sampling.seeds import initial_noise, make_generators
from acestep_triton.text_tokenizer import TextTokenizer

Engine = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


class Text2MusicPipeline:
    """Prompt + lyrics + parameters -> 48 kHz stereo waveforms, with per-stage timings.

    `adapters`: the LoRA adapters of the engines' shared transformer (requests naming one need it).
    """

    def __init__(self, text_tokenizer: TextTokenizer, lyric_tokenizer: LyricTokenizer,
                 engines: Mapping[str, Engine], device: torch.device,
                 geometry: LatentGeometry = PUBLISHED_GEOMETRY, adapters: AdapterStore | None = None) -> None:
        missing = set(NEURAL_COMPONENTS) - set(engines)
        if missing:
            raise ValueError(f"engines missing for {sorted(missing)}")
        self.text_tokenizer = text_tokenizer
        self.lyric_tokenizer = lyric_tokenizer
        self.engines = dict(engines)
        self.device = device
        self.geometry = geometry
        self.adapters = adapters

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike | Checkpoint,
        lyric_vocab: str | os.PathLike | None = None,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        accelerate: bool = False,
        adapters: AdapterSettings | None = None,
    ) -> Text2MusicPipeline:
        """Load every component (one shared transformer); `accelerate` applies the gpu profile's
        speed-ups (CUDA only, see acestep_triton.acceleration); `adapters` serves LoRA adapters."""
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else validate_checkpoint(checkpoint)
        loaded = load_engines(NEURAL_COMPONENTS, ckpt, device, dtype, accelerate, adapters)
        return cls(
            TextTokenizer.from_pretrained(ckpt.text_encoder),
            LyricTokenizer.from_file(find_lyric_vocab(ckpt, lyric_vocab)),
            {name: engine.run for name, engine in loaded.items()},
            torch.device(device),
            latent_geometry(ckpt),
            loaded["dit_step"].adapters,
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
            rows = {name: torch.from_numpy(array) for name, array in prepared.tensors().items()}
            adapter = adapter_rows(self.adapters, params.lora_name_or_path, params.lora_weight)
        with stage("text_encoder"):
            text_states = self.engines["text_encoder"](rows)["TEXT_STATES"]
        with stage("condition_encoder"):
            out = self.engines["condition_encoder"]({**rows, "TEXT_STATES": text_states,
                                                     **adapter(len(prepared.branches))})
            conditions = Conditions(prepared.branches, out["ENCODER_STATES"].to(self.device),
                                    out["ENCODER_MASK"].to(self.device))
        with stage("diffusion"):
            generators = make_generators(prepared.seeds)
            noise = initial_noise(generators, self.geometry.frames(prepared.duration), self.geometry, self.device)

            per_branches: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

            def step_fn(latents, timestep, branches):
                key = tuple(branches)
                if key not in per_branches:
                    per_branches[key] = {**branch_inputs(conditions, key, noise.shape[0], noise.shape[-1],
                                                         params.use_erg_diffusion),
                                         **adapter(latents.shape[0])}
                batch = {"LATENTS": latents, "TIMESTEP": timestep.reshape(-1, 1), **per_branches[key]}
                return self.engines["dit_step"](batch)["VELOCITY"].to(latents)

            latents = denoise(step_fn, params, noise, generators, callback)
        with stage("dcae_decoder"):
            mel = self.engines["dcae_decoder"]({"LATENTS": latents})["MEL"]
        with stage("vocoder"):
            waveforms = self.engines["vocoder"]({"MEL": mel})["WAVEFORM"].float().cpu()
        return GenerationResult(waveforms.numpy(), prepared.seeds, prepared.duration, timings)
