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
  onnx  python backend running the exported ONNX graphs with ONNX Runtime
  tensorrt  the five neural components as `tensorrt_plan` models (engines from export.tensorrt_build,
        --engine-dir; their I/O read from the ONNX graphs they were built from); preprocess and the
        sampling loop stay python. Plans cannot time themselves: their TIME_<stage> outputs are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from acestep_triton.checkpoint import DEPLOYMENT_CHECKPOINT, Checkpoint, find_lyric_vocab, validate_checkpoint
from acestep_triton.contract import (
    ENSEMBLE_INPUTS,
    ENSEMBLE_NAME,
    ENSEMBLE_OUTPUTS,
    SAMPLING_PARAMS,
    STAGES,
    TensorSpec,
    stage_time_name,
)
from acestep_triton.geometry import latent_geometry
from acestep_triton.registry import NEURAL_COMPONENTS, component, component_spec
from acestep_triton.specs import ComponentSpec
from export.model_config import DynamicBatching, EnsembleStep, InstanceGroup, ModelSpec, write_model

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_SOURCES = REPO_ROOT / "model_repository"
# The published checkpoint's config.json files (as golden/full-size-configs): the dims of the
# committed repository.
PUBLISHED_CONFIGS = REPO_ROOT / "benchmarks" / "full_size_configs"


@dataclass(frozen=True)
class Profile:
    """A deployment profile: where and how every component runs (not TensorRT's optimisation profiles)."""

    name: str
    engine: str  # "pytorch" | "onnx" | "tensorrt"
    device: str
    dtype: str
    instance_kind: str
    accelerate: bool = False
    # concurrent sampling loops: each diffusion instance runs one request's loop at a time, and only
    # loops running side by side give dit_step rows from several requests to batch
    diffusion_instances: int = 1
    loop_threads: int | None = None  # torch CPU threads per loop instance (None: torch's default)


PROFILES = {
    "cpu": Profile("cpu", "pytorch", "cpu", "float32", "KIND_CPU", diffusion_instances=4),
    "gpu": Profile("gpu", "pytorch", "cuda", "bfloat16", "KIND_GPU", accelerate=True, diffusion_instances=16,
                   loop_threads=1),
    "onnx": Profile("onnx", "onnx", "cpu", "float32", "KIND_CPU", diffusion_instances=4),
    "tensorrt": Profile("tensorrt", "tensorrt", "cuda", "bfloat16", "KIND_GPU", diffusion_instances=16, loop_threads=1),
}


def _time(stage: str, dims: tuple[int, ...] = (1,)) -> TensorSpec:
    return TensorSpec(stage_time_name(stage), "TYPE_FP32", dims)


def _unbatched(spec: TensorSpec) -> TensorSpec:
    """A batched tensor as seen by a model without a batch axis."""
    return TensorSpec(spec.name, spec.dtype, (-1, *spec.dims))


def preprocess_model(ckpt: Checkpoint, checkpoint: str, lyric_vocab: Path | None) -> ModelSpec:
    text = component_spec("text_encoder", ckpt)
    cond = component_spec("condition_encoder", ckpt)
    branch_rows = [text.input("TEXT_IDS"), text.input("TEXT_MASK"), text.input("TEXT_Q_SCALE"),
                   cond.input("TEXT_SCALE"), cond.input("LYRIC_IDS"), cond.input("LYRIC_MASK"),
                   cond.input("LYRIC_Q_SCALE")]
    return ModelSpec(
        name="preprocess",
        backend="python",
        inputs=ENSEMBLE_INPUTS,
        outputs=(*map(_unbatched, branch_rows),
                 TensorSpec("SEEDS", "TYPE_INT64", (-1,)),
                 TensorSpec("DURATION", "TYPE_FP32", (1,)),
                 _time("preprocess", (1, 1))),
        instance_group=InstanceGroup("KIND_CPU", 1),
        parameters={"CHECKPOINT": checkpoint, **({"LYRIC_VOCAB": str(lyric_vocab)} if lyric_vocab else {})},
    )


def component_model(spec: ComponentSpec, checkpoint: str, profile: Profile, onnx_dir: Path | None) -> ModelSpec:
    """A neural component behind the python backend; dynamic batching, ragged inputs padded."""
    parameters = {"CHECKPOINT": checkpoint, "DEVICE": profile.device, "DTYPE": profile.dtype,
                  "ENGINE": profile.engine}
    if onnx_dir is not None:
        parameters["ONNX_PATH"] = str(onnx_dir / f"{spec.name}.onnx")
    if profile.accelerate:
        parameters["ACCELERATE"] = "1"
    batching = component(spec.name).batching
    return ModelSpec(
        name=spec.name,
        backend="python",
        inputs=spec.inputs,
        outputs=(*spec.outputs, _time(spec.name)),
        max_batch_size=spec.max_batch_size,
        dynamic_batching=DynamicBatching(max_queue_delay_us=batching.queue_delay_us),
        ragged_inputs=frozenset(spec.ragged_inputs),
        instance_group=InstanceGroup(profile.instance_kind, batching.instance_count(profile.name)),
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
    batching = component(spec.name).batching
    return ModelSpec(
        name=spec.name,
        platform="tensorrt_plan",
        inputs=inputs,
        outputs=outputs,
        max_batch_size=spec.max_batch_size,
        dynamic_batching=DynamicBatching(max_queue_delay_us=batching.queue_delay_us),
        instance_group=InstanceGroup("KIND_GPU", batching.instance_count(profile.name),
                                     profiles=tuple(str(i) for i in range(len(profiles)))),
    )


def diffusion_model(ckpt: Checkpoint, profile: Profile) -> ModelSpec:
    """The sampling loop (BLS): calls `dit_step` once per step with every guidance branch batched."""
    cond = component_spec("condition_encoder", ckpt)
    geometry = latent_geometry(ckpt)
    params = tuple(t for t in ENSEMBLE_INPUTS if t.param in SAMPLING_PARAMS)
    return ModelSpec(
        name="diffusion",
        backend="python",
        inputs=(*map(_unbatched, cond.outputs), TensorSpec("SEEDS", "TYPE_INT64", (-1,)),
                TensorSpec("DURATION", "TYPE_FP32", (1,)), *params),
        outputs=(TensorSpec("LATENTS", "TYPE_FP32", (-1, geometry.channels, geometry.height, -1)),
                 _time("diffusion", (1, 1))),
        instance_group=InstanceGroup("KIND_CPU", profile.diffusion_instances),
        parameters={"DIT_MODEL": "dit_step",
                    **({"TORCH_THREADS": str(profile.loop_threads)} if profile.loop_threads else {})},
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
        inputs=ENSEMBLE_INPUTS,
        outputs=tuple(t for t in ENSEMBLE_OUTPUTS if t.name in produced),
        ensemble_steps=steps,
    )


def build_repository(
    profile: str,
    checkpoint: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    lyric_vocab: str | os.PathLike | None = None,
    onnx_dir: str | os.PathLike | None = None,
    engine_dir: str | os.PathLike | None = None,
) -> Path:
    """Write the whole repository for `profile` into `out_dir` and return it.

    `checkpoint` None: the deployment names it (see the module docstring), pytorch profiles only.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    chosen = PROFILES[profile]
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
            export_component(name, ckpt, onnx_path)

    models = {"preprocess": preprocess_model(ckpt, checkpoint_param, vocab),
              "diffusion": diffusion_model(ckpt, chosen)}
    engines = {}
    for name in NEURAL_COMPONENTS:
        spec = component_spec(name, ckpt)
        if chosen.engine == "tensorrt":
            engines[name] = find_engine(Path(engine_dir), name)
            models[name] = plan_model(spec, engines[name], onnx_path / f"{name}.onnx", chosen)
        else:
            models[name] = component_model(spec, checkpoint_param, chosen, onnx_path)
    models[ENSEMBLE_NAME] = ensemble_model(models)
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
    args = parser.parse_args(argv)
    out = build_repository(args.profile, args.checkpoint, args.out, args.lyric_vocab, args.onnx_dir,
                           args.engine_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
