"""The in-process pipeline of every task: the reference the Triton ensemble is checked against.

Stages are the ensemble's (contract.STAGES) and call the same code the Triton models call:
prepare_request -> text_encoder -> condition_encoder -> [dcae_encoder] + generate(dit_step) ->
dcae_decoder -> vocoder. The loop's calls go through the served loop's step function
(bls_loop.StepLoop, conditions sent once per branch by key) to a `dit_step` callable that takes the
same requests as the Triton model (for a loaded checkpoint, acestep_triton.dit_step.DitStep with its
own condition cache).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager

import numpy as np
import torch

from acestep_triton.adapters import AdapterChoice, AdapterSettings
from acestep_triton.bls_loop import StepLoop
from acestep_triton.checkpoint import Checkpoint, find_lyric_vocab, validate_checkpoint
from acestep_triton.condition_cache import ConditionCache, ConditionSender, new_request_id
from acestep_triton.contract import GenerationParams, GenerationResult, SourceAudio
from acestep_triton.dit_step import DitStep
from acestep_triton.engines import load_engines
from acestep_triton.geometry import PUBLISHED_GEOMETRY, LatentGeometry, latent_geometry
from acestep_triton.lora import AdapterStore, adapter_rows
from acestep_triton.lyrics import LyricTokenizer
from acestep_triton.models.dcae import encoder_audio
from acestep_triton.preprocess import PreparedRequest, prepare_request
from acestep_triton.registry import NEURAL_COMPONENTS
from acestep_triton.sampling.conditions import Conditions
from acestep_triton.sampling.loop import ProgressFn
from acestep_triton.sampling.seeds import make_generators
from acestep_triton.sampling.tasks import call_plan, generate
from acestep_triton.text_tokenizer import TextTokenizer

Engine = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]
# The in-process condition cache: a request releases its entries at its last step; this bounds
# what requests that stopped early (and released) could leave behind.
CONDITION_CACHE_BYTES = 16 * 2**30
CONDITION_CACHE_TTL_S = 600.0


def engine_calls(engines: Mapping[str, object]) -> dict[str, Engine]:
    """The pipeline's callables over loaded engines (TorchEngine / OnnxEngine): each one's `run`,
    and for dit_step a DitStep with its own condition cache (it takes the loop's keyed requests)."""
    calls: dict[str, Engine] = {name: engine.run for name, engine in engines.items()}
    calls["dit_step"] = DitStep(engines["dit_step"], ConditionCache(CONDITION_CACHE_BYTES, CONDITION_CACHE_TTL_S))
    return calls


class Text2MusicPipeline:
    """Prompt + lyrics + parameters (+ source audio) -> 48 kHz stereo waveforms, with per-stage timings.

    Every task (contract.TASKS); the name is the one the gateway and the benchmarks know it by.
    `engines` maps each component to a callable on named tensors; "dit_step"'s takes a `dit_step`
    request as the Triton model does (conditions by CONDITION_KEY once sent: `engine_calls`; with
    `adapters`, every row's LoRA adapter by ADAPTER / ADAPTER_WEIGHT). `adapters`: the LoRA adapters of
    the engines' shared transformer (requests naming one need it).
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
            engine_calls(loaded),
            torch.device(device),
            latent_geometry(ckpt),
            loaded["dit_step"].adapters,
        )

    def prepare(self, params: GenerationParams, source: SourceAudio | None = None) -> PreparedRequest:
        return prepare_request(params, self.text_tokenizer.tokenize_one, self.lyric_tokenizer.tokenize, source)

    def encode_source(self, source: SourceAudio) -> torch.Tensor:
        """Source audio -> its latents [1, 8, 16, T] on the pipeline's device (the dcae_encoder stage)."""
        audio = encoder_audio(torch.from_numpy(np.asarray(source.samples, dtype=np.float32)), int(source.sample_rate),
                              self.geometry.sample_rate, self.geometry.audio_channels)
        return self.engines["dcae_encoder"]({"AUDIO": audio})["LATENTS"].to(self.device)

    def __call__(self, params: GenerationParams, callback: ProgressFn | None = None,
                 source: SourceAudio | None = None) -> GenerationResult:
        """Run `params.task`; `source` is the audio of the tasks that start from one
        (contract.AUDIO_INPUT_TASKS), as decoded from its file. ParameterError for a request that
        cannot run (naming the field)."""
        timings: dict[str, float] = {}

        @contextmanager
        def stage(name: str):
            start = time.perf_counter()
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            timings[name] = time.perf_counter() - start

        with stage("preprocess"):
            prepared = self.prepare(params, source)
            rows = {name: torch.from_numpy(array) for name, array in prepared.tensors().items()}
            adapter = adapter_rows(self.adapters, params.lora_name_or_path, params.lora_weight)
        with stage("text_encoder"):
            text_states = self.engines["text_encoder"](rows)["TEXT_STATES"]
        with stage("condition_encoder"):
            out = self.engines["condition_encoder"]({**rows, "TEXT_STATES": text_states,
                                                     **adapter(len(prepared.branches))})
            conditions = Conditions(prepared.branches, out["ENCODER_STATES"].to(self.device),
                                    out["ENCODER_MASK"].to(self.device))
        with stage("diffusion"):  # the Triton `diffusion` model encodes the source too
            source_latents = self.encode_source(source) if source is not None else None
            frames = None if source_latents is None else source_latents.shape[-1]
            choice = AdapterChoice(params.lora_name_or_path, params.lora_weight)
            sender = ConditionSender(new_request_id(), choice)
            loop = StepLoop(lambda batch: self.engines["dit_step"](batch)["VELOCITY"], conditions,
                            params.use_erg_diffusion, sender, call_plan(params, frames),
                            choice if self.adapters is not None else None)
            try:
                latents = generate(loop.step, params, make_generators(prepared.seeds),
                                   make_generators(prepared.retake_seeds), prepared.duration, source_latents, callback,
                                   self.device)
            except BaseException:
                loop.release()
                raise
        with stage("dcae_decoder"):
            mel = self.engines["dcae_decoder"]({"LATENTS": latents})["MEL"]
        with stage("vocoder"):
            waveforms = self.engines["vocoder"]({"MEL": mel})["WAVEFORM"].float().cpu()
        return GenerationResult(waveforms.numpy(), prepared.seeds, prepared.duration, timings,
                                retake_seeds=prepared.retake_seeds)
