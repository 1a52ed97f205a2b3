"""Generate a Triton model repository for a profile: every config.pbtxt from Python, model.py copied.

    python -m export.build_repository --profile cpu|gpu|onnx|tensorrt --checkpoint DIR --out DIR
    python -m export.build_repository --profile cpu --out model_repository   # the committed one

Without --checkpoint (pytorch-engine profiles only) the dims come from the published checkpoint's
configs (PUBLISHED_CONFIGS), every model's CHECKPOINT is "$ACESTEP_CHECKPOINT" and preprocess has
no LYRIC_VOCAB: the deployment sets ACESTEP_CHECKPOINT to its checkpoint directory
(checkpoint.deployment_checkpoint), whose lyric vocabulary is found as find_lyric_vocab says. That is
how the committed `model_repository/` is made (tests/test_committed_repository.py holds it to it).

Profiles (where each component runs; the ensemble wiring is the same for all):
  cpu   python backend, PyTorch float32 on the CPU (the embedded default and CI)
  gpu   python backend, PyTorch bfloat16 on CUDA, with acestep_triton.acceleration's speed-ups
        (compiled blocks, CUDA-graph decode and vocoder windows, warmed up at load)
  lowvram  the gpu profile's placement squeezed under 8 GiB of GPU memory (acestep_triton.low_vram):
        encoders on the CPU, dit_step resident in bfloat16, the decoders' weights in host memory
        between executions; server options from `server_arguments`
  onnx  python backend running the exported ONNX graphs with ONNX Runtime
  tensorrt  the neural components as `tensorrt_plan` models (engines from export.tensorrt_build,
        --engine-dir; their I/O read from the ONNX graphs they were built from); preprocess, the
        sampling loop and the components TensorRT cannot build (registry `plan`: dcae_encoder) stay
        python. Plans cannot time themselves: their TIME_<stage> outputs are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from acestep_triton.adapters import DEPLOYMENT_ADAPTERS_DIR
from acestep_triton.checkpoint import DEPLOYMENT_CHECKPOINT, Checkpoint, find_lyric_vocab, validate_checkpoint
from acestep_triton.contract import (
    ENSEMBLE_INPUTS,
    ENSEMBLE_NAME,
    AUDIO_CHUNK_OUTPUTS,
    ENSEMBLE_OUTPUTS,
    MAX_DURATION_S,
    PROGRESS_OUTPUTS,
    SAMPLING_PARAMS,
    SOURCE_INPUTS,
    STAGES,
    STREAM_INPUTS,
    STREAM_MODEL_NAME,
    TASK_INPUTS,
    TensorSpec,
    stage_time_name,
)
from acestep_triton.geometry import PUBLISHED_GEOMETRY, latent_geometry
from acestep_triton.registry import NEURAL_COMPONENTS, component, component_spec
from acestep_triton.specs import ADAPTER_INPUTS, CONDITION_INPUTS, KEYED_INPUTS, ComponentSpec
from export.model_config import DynamicBatching, EnsembleStep, InstanceGroup, ModelSpec, write_model

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_SOURCES = REPO_ROOT / "model_repository"
# The published checkpoint's config.json files (as golden/full-size-configs): the dims of the
# committed repository.
PUBLISHED_CONFIGS = REPO_ROOT / "benchmarks" / "full_size_configs"


@dataclass(frozen=True)
class Profile:
    """A deployment profile (not TensorRT's optimisation profiles): where and how each model runs.
    Every field is a named setting the measurements choose (`build_repository(..., overrides=...)`
    and benchmarks/bench_triton.py's --set change them); the components' own facts (tensors, max
    batch size) are in acestep_triton.registry.

    Instances: a python-backend instance is a process that runs one execute() at a time, so a
    stage with one instance makes concurrent requests queue behind each other. `preprocess` is
    CPU-bound tokenisation (KIND_CPU); the neural stages are KIND_GPU on the gpu profile, each
    instance holding its own weights (and CUDA graphs) on the device. dit_step stays at one
    instance per GPU: rows from all loops then batch together, and its condition cache is hit.
    `gpus` lists the devices KIND_GPU instances go to (empty: every visible GPU, `count` on each).
    """

    name: str
    engine: str  # "pytorch" | "onnx" | "tensorrt"
    device: str
    dtype: str
    instance_kind: str
    # how long dit_step waits for rows of other loops before running a step. Under load the
    # instance is busy while rows queue, so batches form without waiting; a delay adds its length
    # to every step of a lone request.
    dit_queue_delay_us: int
    accelerate: bool = False
    # the same for the other neural components (their requests come one per loop request)
    queue_delay_us: int = 1000
    # concurrent sampling loops: each diffusion instance runs one request's loop at a time, and only
    # loops running side by side give dit_step rows from several requests to batch
    diffusion_instances: int = 1
    loop_threads: int | None = None  # torch CPU threads per loop instance (None: torch's default)
    # where the loop's tensors live: "cpu" (no CUDA context per loop instance; latents and velocities
    # cross the host each step, ~0.3 MB per row at 60 s) or "cuda" (they stay on the GPU and cross
    # BLS as CUDA tensors through CUDA IPC; each loop instance then holds a CUDA context)
    loop_device: str = "cpu"
    preprocess_instances: int = 1
    text_encoder_instances: int = 1
    condition_encoder_instances: int = 1
    dcae_encoder_instances: int = 1
    dit_step_instances: int = 1
    dcae_decoder_instances: int = 1
    vocoder_instances: int = 1
    gpus: tuple[int, ...] = ()
    # the most rows x latent frames one dit_step forward holds (acestep_triton.sub_batches): more
    # rows in one execution run in several forwards, so running out of memory fails one sub-batch
    dit_max_row_frames: int = 64 * PUBLISHED_GEOMETRY.frames(MAX_DURATION_S)
    # per dit_step instance; LRU beyond it. An entry is a branch's prepared cross-attention keys and
    # values (full size, bf16: ~126 MiB per 512 condition tokens), so 8 GiB holds ~32 requests' branches
    condition_cache_mib: int = 8192
    condition_cache_ttl_s: float = 300.0  # an entry unused this long is dropped
    # LoRA adapters (acestep_triton.adapters, .lora): loaded per condition_encoder / dit_step instance
    # and kept up to this many, the least recently used unloaded beyond; whether an "owner/name" that
    # is not in the adapters directory is fetched from the Hugging Face hub
    max_adapters: int = 4
    adapters_hub: bool = True
    # The lowvram profile's memory settings (acestep_triton.low_vram; every one off elsewhere).
    # the components' low_vram hooks: compiled dit_step blocks without CUDA graphs, the decoders
    # chunked and windowed one window at a time
    low_vram: bool = False
    # neural components that run on the CPU in float32 whatever `device` says (their processes then
    # hold no CUDA context)
    cpu_components: tuple[str, ...] = ()
    # None: every GPU component keeps its weights on the GPU; otherwise only these do, and the others'
    # weights wait in pinned host memory between executions
    resident_weights: tuple[str, ...] | None = None
    # GPU components hand their allocator's cached memory back to the driver after every execution
    release_cache: bool = False
    # one execution at a time over all GPU components (a file lock), so the working memory of two
    # stages (a decode of one request, the steps of another) is never on the GPU together
    gpu_lock: bool = False
    # the most items one dcae_decoder or vocoder forward decodes (None: the whole batch)
    decoder_max_rows: int | None = None
    # tritonserver's CUDA memory pool per GPU (GPU memory its process holds, for GPU tensors between
    # models) and pinned host pool (None: Triton's defaults, 64 and 256 MiB)
    cuda_memory_pool_mib: int | None = None
    pinned_memory_pool_mib: int | None = None

    @property
    def serves_adapters(self) -> bool:
        """Only PyTorch engines apply adapters; ONNX graphs and TensorRT plans hold the base weights, and
        their preprocess refuses a request naming an adapter (naming lora_name_or_path)."""
        return self.engine == "pytorch"

    def placement(self, name: str) -> tuple[str, str]:
        """(device, dtype) neural component `name` runs with."""
        return ("cpu", "float32") if name in self.cpu_components else (self.device, self.dtype)

    def offloads(self, name: str) -> bool:
        """Whether component `name` keeps its weights in host memory between executions: one on the
        profile's device that `resident_weights` leaves out."""
        resident = self.resident_weights
        return name not in self.cpu_components and resident is not None and name not in resident


# The gpu profile runs the sampling loop on the CPU (loop_device="cpu"). With the condition cache a
# step sends only its latents (~0.3 MB a row at 60 s) and gets the velocity back, which costs about
# what a BLS call with CUDA tensors costs (~1 ms, issue "Served speed"), while a CUDA loop needs a
# CUDA context in each of its 16 processes (several GiB together) and, because CUDA IPC cannot export
# PyTorch's expandable segments (which the server's models keep for their memory), an allocator of
# its own (LOOP_CUDA_ALLOC_CONF). `bench_triton --variant loop_device=cuda` measures the other choice.
# The gpu profile's counts: preprocess tokenises on the CPU (Python, one request at a time per
# instance). One instance each of the decoders: they are GPU-bound (~40 and ~100 ms per 60 s item),
# so a second instance only interleaves with the first on the same GPU, and it held its own weights,
# graphs and cuDNN workspaces (the 2026-11-30 H200 run: 52 GiB at 8 concurrent with two each).
GPU_INSTANCES = {"preprocess_instances": 4, "dcae_decoder_instances": 1, "vocoder_instances": 1}

# The lowvram profile (the spec's "CPU offload"): under 8 GiB of GPU memory summed over every server
# process for a 240 s request (budget per process in benchmarks/NOTES.md, "Low VRAM"). Only dit_step
# (bf16, weights resident: 4.6 GiB) and the decoders (bf16, weights in host memory between
# executions) use the GPU; the encoders run on the CPU in float32 (text ~0.1 s, lyrics ~0.3 s at
# most), sparing their CUDA contexts (~0.5 GiB each). dcae_encoder too: it runs once per request of
# the tasks that start from audio, and as a fourth GPU process its context alone would leave the
# budget no margin, its 240 s encode ~3.2 GiB more (benchmarks/NOTES.md, "Low VRAM"). All instances
# are KIND_CPU, so every request reaches a component in host memory and gets host outputs back
# (ComponentModel): no GPU tensor crosses a process, and with the server's pools off the server
# process holds its CUDA context alone. GPU components take turns (gpu_lock) and return their cached
# memory after each execution. A dit_step forward holds at most one 240 s row's frames (rows x
# frames): a 240 s request's guided steps run their two rows as two forwards, half the working
# memory (~0.4 GiB) and no slower there (one 240 s row already fills the GPU: 28 ms for one row, 62
# ms for two, H100), while shorter requests still run their rows together. The decoders decode one
# item at a time. The condition cache holds one request's prepared cross-attention keys and values
# (~0.13 GiB per branch at ~580 condition tokens: two branches at contract defaults); more requests
# in flight evict each other and resend. dit_step keeps one LoRA adapter loaded (~0.12 GiB of bf16
# factors at rank 64), a request with another loads it in its place.
LOWVRAM = Profile(
    "lowvram", "pytorch", "cuda", "bfloat16", "KIND_CPU", 0, queue_delay_us=0, diffusion_instances=2,
    dit_max_row_frames=PUBLISHED_GEOMETRY.frames(MAX_DURATION_S), condition_cache_mib=512,
    low_vram=True, cpu_components=("text_encoder", "condition_encoder", "dcae_encoder"),
    resident_weights=("dit_step",), release_cache=True, gpu_lock=True, decoder_max_rows=1,
    cuda_memory_pool_mib=0, pinned_memory_pool_mib=0, max_adapters=1,
)

PROFILES = {
    "cpu": Profile("cpu", "pytorch", "cpu", "float32", "KIND_CPU", 2000, diffusion_instances=4),
    "gpu": Profile("gpu", "pytorch", "cuda", "bfloat16", "KIND_GPU", 0, accelerate=True, queue_delay_us=0,
                   diffusion_instances=16, loop_threads=1, dit_max_row_frames=16 * PUBLISHED_GEOMETRY.frames(MAX_DURATION_S),
                   **GPU_INSTANCES),
    "onnx": Profile("onnx", "onnx", "cpu", "float32", "KIND_CPU", 2000, diffusion_instances=4),
    "tensorrt": Profile("tensorrt", "tensorrt", "cuda", "bfloat16", "KIND_GPU", 0, queue_delay_us=0,
                        diffusion_instances=16, loop_threads=1, **GPU_INSTANCES),
    "lowvram": LOWVRAM,
}
# The loop's own allocator when it runs on CUDA: its tensors are sent through BLS with CUDA IPC,
# which cannot export memory from PyTorch's expandable segments.
LOOP_CUDA_ALLOC_CONF = "expandable_segments:False"


def resolve_profile(name: str, overrides: Mapping[str, object] | None = None) -> Profile:
    """PROFILES[name] with `overrides` ({field: value}) applied."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    profile = replace(PROFILES[name], **dict(overrides or {}))
    if profile.loop_device not in ("cpu", "cuda"):
        raise ValueError(f"loop_device must be 'cpu' or 'cuda', got {profile.loop_device!r}")
    named = (*profile.cpu_components, *(profile.resident_weights or ()))
    unknown = sorted(set(named) - set(NEURAL_COMPONENTS))
    if unknown:
        raise ValueError(f"cpu_components / resident_weights: unknown components {unknown}; "
                         f"known: {list(NEURAL_COMPONENTS)}")
    if profile.low_vram and (profile.accelerate or profile.engine != "pytorch"):
        raise ValueError("low_vram applies to the pytorch engine without the gpu profile's speed-ups (accelerate)")
    return profile


def profile_environment(profile: Profile) -> dict[str, str]:
    """Variables a CUDA profile's server runs with, unless already set: PyTorch's expandable segments
    (acestep_triton.acceleration: without them fragmentation reserves ~40 % more at 240 s; an emptied
    cache goes back to the driver) and lazy loading of CUDA modules (a process's CUDA context then
    holds only the kernels it runs)."""
    if profile.device != "cuda":
        return {}
    wanted = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "CUDA_MODULE_LOADING": "LAZY"}
    return {key: os.environ.get(key, value) for key, value in wanted.items()}


def server_arguments(profile: Profile, gpus: int) -> list[str]:
    """tritonserver options the profile sets (its memory pools) on a machine with `gpus` GPUs."""
    arguments = []
    if profile.cuda_memory_pool_mib is not None:
        size = profile.cuda_memory_pool_mib * 2**20
        arguments += [f"--cuda-memory-pool-byte-size={gpu}:{size}" for gpu in range(gpus)]
    if profile.pinned_memory_pool_mib is not None:
        arguments.append(f"--pinned-memory-pool-byte-size={profile.pinned_memory_pool_mib * 2**20}")
    return arguments


def instance_group(profile: Profile, name: str) -> InstanceGroup:
    """`<name>_instances` instances of the profile's kind (on each of `gpus` for KIND_GPU)."""
    count = getattr(profile, f"{name}_instances")
    if profile.instance_kind == "KIND_GPU" and name not in profile.cpu_components:
        return InstanceGroup("KIND_GPU", count, gpus=profile.gpus)
    return InstanceGroup("KIND_CPU", count)


def _time(stage: str, dims: tuple[int, ...] = (1,)) -> TensorSpec:
    return TensorSpec(stage_time_name(stage), "TYPE_FP32", dims)


def _ensemble_output(name: str) -> TensorSpec:
    """The ensemble output `name` (contract.ENSEMBLE_OUTPUTS), as the model that makes it declares it."""
    return next(t for t in ENSEMBLE_OUTPUTS if t.name == name)


def _unbatched(spec: TensorSpec) -> TensorSpec:
    """A batched tensor as seen by a model without a batch axis."""
    return TensorSpec(spec.name, spec.dtype, (-1, *spec.dims))


def adapter_parameters(profile: Profile, adapters_dir: str) -> dict[str, str]:
    """The parameters of the models that resolve or load LoRA adapters (acestep_triton.adapters.
    AdapterSettings.from_parameters); none where the profile serves no adapters."""
    if not profile.serves_adapters:
        return {}
    return {"ADAPTERS_DIR": adapters_dir, "ADAPTERS_HUB": "1" if profile.adapters_hub else "0",
            "MAX_ADAPTERS": str(profile.max_adapters)}


def preprocess_model(ckpt: Checkpoint, checkpoint: str, lyric_vocab: Path | None, profile: Profile,
                     adapters: Mapping[str, str]) -> ModelSpec:
    text = component_spec("text_encoder", ckpt)
    cond = component_spec("condition_encoder", ckpt)
    branch_rows = [text.input("TEXT_IDS"), text.input("TEXT_MASK"), text.input("TEXT_Q_SCALE"),
                   cond.input("TEXT_SCALE"), cond.input("LYRIC_IDS"), cond.input("LYRIC_MASK"),
                   cond.input("LYRIC_Q_SCALE"), *ADAPTER_INPUTS]
    return ModelSpec(
        name="preprocess",
        backend="python",
        inputs=(*ENSEMBLE_INPUTS, *TASK_INPUTS),
        outputs=(*map(_unbatched, branch_rows),
                 _ensemble_output("SEEDS"),
                 _ensemble_output("RETAKE_SEEDS_USED"),
                 _ensemble_output("DURATION"),
                 _time("preprocess", (1, 1))),
        instance_group=InstanceGroup("KIND_CPU", profile.preprocess_instances),
        parameters={"CHECKPOINT": checkpoint, **({"LYRIC_VOCAB": str(lyric_vocab)} if lyric_vocab else {}),
                    "ENGINE": profile.engine, **adapters},
    )


# The components `decoder_max_rows` bounds.
DECODERS = ("dcae_decoder", "vocoder")


def queue_delay_us(profile: Profile, name: str) -> int:
    """How long model `name` waits for requests of other loops before it runs."""
    return profile.dit_queue_delay_us if name == "dit_step" else profile.queue_delay_us


def component_model(spec: ComponentSpec, checkpoint: str, profile: Profile, onnx_dir: Path | None,
                    adapters: Mapping[str, str]) -> ModelSpec:
    """A neural component behind the python backend; dynamic batching, ragged inputs padded.

    On CUDA it takes its inputs where they are (FORCE_CPU_ONLY_INPUT_TENSORS=no), so tensors made
    on the GPU by the previous model stay there. dit_step also takes the condition cache's inputs
    (acestep_triton.condition_cache), which make its conditions optional. A component that takes
    LoRA adapters (registry `lora`) takes the optional per-row ADAPTER_INPUTS where the profile serves them.
    The lowvram profile's settings become the parameters acestep_triton.triton_python.ComponentModel reads.
    """
    device, dtype = profile.placement(spec.name)
    parameters = {"CHECKPOINT": checkpoint, "DEVICE": device, "DTYPE": dtype, "ENGINE": profile.engine}
    if onnx_dir is not None:
        parameters["ONNX_PATH"] = str(onnx_dir / f"{spec.name}.onnx")
    if device == "cuda":
        parameters["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
    if spec.name not in profile.cpu_components:  # on the profile's device (the CPU too, as the tests run it)
        flags = {"ACCELERATE": profile.accelerate, "LOW_VRAM": profile.low_vram,
                 "OFFLOAD_WEIGHTS": profile.offloads(spec.name), "RELEASE_CACHE": profile.release_cache,
                 "GPU_LOCK": profile.gpu_lock}
        parameters.update({key: "1" for key, on in flags.items() if on})
    if spec.name in DECODERS and profile.decoder_max_rows is not None:
        parameters["MAX_ROW_FRAMES"] = str(profile.decoder_max_rows)  # no ragged axis: the bound counts rows
    inputs, optional = spec.inputs, frozenset()
    if spec.name == "dit_step":
        inputs, optional = (*spec.inputs, *CONDITION_INPUTS), frozenset(KEYED_INPUTS) | {t.name for t in CONDITION_INPUTS}
        parameters["MAX_ROW_FRAMES"] = str(profile.dit_max_row_frames)
        parameters["CONDITION_CACHE_MIB"] = str(profile.condition_cache_mib)
        parameters["CONDITION_CACHE_TTL_S"] = str(profile.condition_cache_ttl_s)
    if component(spec.name).lora and adapters:
        inputs, optional = (*inputs, *ADAPTER_INPUTS), optional | {t.name for t in ADAPTER_INPUTS}
        parameters.update(adapters)
    return ModelSpec(
        name=spec.name,
        backend="python",
        inputs=inputs,
        outputs=(*spec.outputs, _time(spec.name)),
        max_batch_size=spec.max_batch_size,
        dynamic_batching=DynamicBatching(max_queue_delay_us=queue_delay_us(profile, spec.name)),
        ragged_inputs=frozenset(spec.ragged_inputs),
        optional_inputs=optional,
        instance_group=instance_group(profile, spec.name),
        parameters=parameters,
    )


def find_engine(engine_dir: Path, name: str) -> Path:
    """The one `<name>.trt<version>.<precision>.<profile>.plan` export.tensorrt_build wrote."""
    found = sorted(Path(engine_dir).glob(f"{name}.trt*.plan"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"{engine_dir}: expected one {name}.trt*.plan engine, found {[p.name for p in found] or 'none'}; "
            f"build them with `python -m export.tensorrt_build` (inside the NGC image, see docker/README.md)"
        )
    return found[0]


def plan_model(spec: ComponentSpec, engine: Path, onnx_file: Path, profile: Profile) -> ModelSpec:
    """A neural component as a TensorRT plan: I/O exactly as the ONNX graph it was built from declares,
    every optimisation profile the engine's manifest records usable by its instances."""
    from export.graph_io import triton_io
    from export.tensorrt_build import engine_manifest

    inputs, outputs = triton_io(onnx_file)
    profiles = json.loads(engine_manifest(engine).read_text())["profiles"]
    return ModelSpec(
        name=spec.name,
        platform="tensorrt_plan",
        inputs=inputs,
        outputs=outputs,
        max_batch_size=spec.max_batch_size,
        dynamic_batching=DynamicBatching(max_queue_delay_us=queue_delay_us(profile, spec.name)),
        instance_group=replace(instance_group(profile, spec.name), profiles=tuple(str(i) for i in range(len(profiles)))),
    )


def diffusion_model(ckpt: Checkpoint, profile: Profile) -> ModelSpec:
    """The sampling loop (BLS): calls `dit_step` once per step with every guidance branch batched,
    and `dcae_encoder` once for the tasks that start from audio (SOURCE_INPUTS, optional).

    A python `dit_step` keeps the conditions of a request (CONDITION_CACHE=1); a TensorRT plan
    cannot, so the loop sends them with every step there. Where dit_step takes the adapter inputs
    (SEND_ADAPTERS=1), every step's rows carry the request's adapter.
    """
    cond = component_spec("condition_encoder", ckpt)
    geometry = latent_geometry(ckpt)
    params = tuple(t for t in (*ENSEMBLE_INPUTS, *TASK_INPUTS) if t.param in SAMPLING_PARAMS)
    source = tuple(t for t in TASK_INPUTS if t.name in SOURCE_INPUTS)
    parameters = {"LOOP_DEVICE": profile.loop_device,
                  "CONDITION_CACHE": "0" if profile.engine == "tensorrt" else "1",
                  "SEND_ADAPTERS": "1" if profile.serves_adapters else "0"}
    if profile.loop_threads:
        parameters["TORCH_THREADS"] = str(profile.loop_threads)
    if profile.loop_device == "cuda":
        group = InstanceGroup("KIND_GPU", profile.diffusion_instances, gpus=profile.gpus)
        parameters.update(FORCE_CPU_ONLY_INPUT_TENSORS="no", CUDA_ALLOC_CONF=LOOP_CUDA_ALLOC_CONF)
    else:
        group = InstanceGroup("KIND_CPU", profile.diffusion_instances)
    return ModelSpec(
        name="diffusion",
        backend="python",
        inputs=(*map(_unbatched, cond.outputs), *map(_unbatched, ADAPTER_INPUTS), _ensemble_output("SEEDS"),
                _ensemble_output("RETAKE_SEEDS_USED"), _ensemble_output("DURATION"), *params, *source),
        outputs=(TensorSpec("LATENTS", "TYPE_FP32", (-1, geometry.channels, geometry.height, -1)),
                 _time("diffusion", (1, 1))),
        instance_group=group,
        parameters=parameters,
    )


def _identity(tensors) -> dict[str, str]:
    return {t.name: t.name for t in tensors}


def ensemble_model(models: dict[str, ModelSpec]) -> ModelSpec:
    """preprocess -> text_encoder -> condition_encoder -> diffusion -> dcae_decoder -> vocoder.

    Tensor names are shared end to end, so every map is the identity.
    """
    steps = tuple(
        EnsembleStep(name, _identity(models[name].inputs), _identity(models[name].outputs)) for name in STAGES
    )
    produced = {t.name for name in STAGES for t in models[name].outputs}
    return ModelSpec(
        name=ENSEMBLE_NAME,
        platform="ensemble",
        inputs=(*ENSEMBLE_INPUTS, *TASK_INPUTS),
        outputs=tuple(t for t in ENSEMBLE_OUTPUTS if t.name in produced),
        ensemble_steps=steps,
    )


def stream_model(models: dict[str, ModelSpec], checkpoint: str) -> ModelSpec:
    """`acestep_stream`: the ensemble's stages in one decoupled python model that reports progress.

    It calls preprocess, text_encoder, condition_encoder, dcae_decoder and vocoder by BLS (their
    tensor names, read from their specs, go in the STAGES parameter) and runs the sampling loop
    itself with the `diffusion` model's code, so it takes the diffusion model's parameters and
    instance group (one stream runs one loop at a time, on the loop's device). It reads the
    vocoder's receptive field from `checkpoint`, whatever engine serves the vocoder.
    """
    ensemble = models[ENSEMBLE_NAME]
    stages = [
        {"model": step.model_name, "inputs": list(step.input_map), "outputs": list(step.output_map)}
        for step in ensemble.ensemble_steps
    ]
    loop = models["diffusion"]
    return ModelSpec(
        name=STREAM_MODEL_NAME,
        backend="python",
        inputs=(*ensemble.inputs, *STREAM_INPUTS),
        outputs=(*ensemble.outputs, *PROGRESS_OUTPUTS, *AUDIO_CHUNK_OUTPUTS),
        instance_group=loop.instance_group,
        parameters={**loop.parameters, "STAGES": json.dumps(stages), "LOOP_STAGE": "diffusion",
                    "VOCODER_STAGE": "vocoder", "CHECKPOINT": checkpoint},
        decoupled=True,
    )


def build_repository(
    profile: str,
    checkpoint: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    lyric_vocab: str | os.PathLike | None = None,
    onnx_dir: str | os.PathLike | None = None,
    engine_dir: str | os.PathLike | None = None,
    overrides: Mapping[str, object] | None = None,
    adapters_dir: str | os.PathLike | None = None,
) -> Path:
    """Write the whole repository for `profile` (with `overrides` of its settings) into `out_dir`.

    `checkpoint` None: the deployment names it (see the module docstring), pytorch profiles only.
    `adapters_dir`: the LoRA adapters directory; None: the one $ACESTEP_ADAPTERS_DIR names when the
    server starts (none when it is unset).
    """
    chosen = resolve_profile(profile, overrides)
    if checkpoint is None:
        if chosen.engine != "pytorch":
            raise ValueError(f"the {profile} profile exports the checkpoint's graphs: give --checkpoint")
        ckpt, checkpoint_param, vocab = Checkpoint(PUBLISHED_CONFIGS), DEPLOYMENT_CHECKPOINT, None
    else:
        ckpt = validate_checkpoint(checkpoint)
        checkpoint_param, vocab = str(ckpt.root), find_lyric_vocab(ckpt, lyric_vocab)
    out = Path(out_dir).resolve()
    if chosen.engine == "tensorrt" and engine_dir is None:
        raise ValueError("the tensorrt profile needs --engine-dir: engines built by `python -m export.tensorrt_build` "
                         "(TensorRT runs inside the NGC image, see docker/README.md)")
    onnx_path = None
    if chosen.engine in ("onnx", "tensorrt"):
        from export.onnx_export import export_component

        onnx_path = Path(onnx_dir) if onnx_dir else out / "onnx"
        for name in NEURAL_COMPONENTS:
            if chosen.engine == "onnx" or component(name).plan:
                export_component(name, ckpt, onnx_path)

    adapters = adapter_parameters(chosen, str(Path(adapters_dir).resolve()) if adapters_dir else DEPLOYMENT_ADAPTERS_DIR)
    models = {"preprocess": preprocess_model(ckpt, checkpoint_param, vocab, chosen, adapters),
              "diffusion": diffusion_model(ckpt, chosen)}
    engines = {}
    for name in NEURAL_COMPONENTS:
        spec = component_spec(name, ckpt)
        if chosen.engine != "tensorrt":
            models[name] = component_model(spec, checkpoint_param, chosen, onnx_path, adapters)
        elif component(name).plan:
            engines[name] = find_engine(Path(engine_dir), name)
            models[name] = plan_model(spec, engines[name], onnx_path / f"{name}.onnx", chosen)
        else:  # TensorRT cannot build it (registry `plan`): PyTorch on the profile's device and dtype
            models[name] = component_model(spec, checkpoint_param, replace(chosen, engine="pytorch"), None, adapters)
    models[ENSEMBLE_NAME] = ensemble_model(models)
    models[STREAM_MODEL_NAME] = stream_model(models, checkpoint_param)
    for name, spec in models.items():
        source = MODEL_SOURCES / name / "1" / "model.py"
        model_dir = write_model(spec, out, source if spec.backend == "python" else None)
        if name in engines:
            shutil.copyfile(engines[name], model_dir / "1" / "model.plan")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", required=True, choices=sorted(PROFILES))
    parser.add_argument("--checkpoint", help="checkpoint directory (published layout); leave out for the "
                        "committed repository, whose deployment sets $ACESTEP_CHECKPOINT")
    parser.add_argument("--out", required=True, help="model repository to write")
    parser.add_argument("--lyric-vocab", help="lyric vocabulary (default: <checkpoint>/lyric_vocab.json)")
    parser.add_argument("--onnx-dir", help="ONNX graphs for the onnx/tensorrt profiles (default: <out>/onnx)")
    parser.add_argument("--engine-dir", help="TensorRT engines for the tensorrt profile")
    parser.add_argument("--adapters-dir", help="LoRA adapters directory (default: $ACESTEP_ADAPTERS_DIR when the "
                        "server starts)")
    args = parser.parse_args(argv)
    out = build_repository(args.profile, args.checkpoint, args.out, args.lyric_vocab, args.onnx_dir,
                           args.engine_dir, adapters_dir=args.adapters_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
