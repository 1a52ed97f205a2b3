"""ONNX -> TensorRT engines for the neural components, with optimisation profiles from the specs.

    python -m export.tensorrt_build --checkpoint DIR --onnx-dir DIR --out DIR \
        [--components ...] [--precision bf16] [--durations 30 60 120 240] [--force]

Runs where TensorRT's Python package and a GPU are: inside the NGC Triton image pinned in
versions.env (docker/), whose TensorRT is the one the server loads plans with. The chain is
staged: the ONNX export (export.onnx_export, cached) -> `<out>/<name>.trt<version>.<precision>.
<shapes tag>.plan`, skipped when that file and its manifest (`.plan.json`) match the ONNX
export; `--force` rebuilds. One timing cache per TensorRT version (`<out>/timing.trt<version>.cache`)
is shared by all builds. Each build ends by running the engine once against PyTorch on the GPU.

Optimisation profiles: one per duration bucket for components with a latent-frames axis
(dit_step, dcae_decoder, vocoder), covering (previous bucket, bucket] seconds, optimised at the
bucket's length; one optimisation profile otherwise. Batch goes from 1 to the spec's max_batch_size (guidance
branches x seeds), prompt tokens to TEXT_MAX_TOKENS and lyric tokens to `max_lyric_tokens`. The
Triton config of a plan with several profiles must list them all in `instance_group.profile`,
or Triton uses only the first.

Precision: the network stays weakly typed (I/O float32 as in the ONNX graph, so the spec's
dtypes hold) and the bf16/fp16 flag lets TensorRT pick lower-precision kernels. fp16 is not
safe for dcae_decoder: its linear attention adds 1e-15 to a denominator, which is 0 in fp16.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from acestep_triton.checkpoint import Checkpoint, CheckpointError, validate_checkpoint
from acestep_triton.contract import MAX_DURATION_S
from acestep_triton.geometry import latent_geometry
from acestep_triton.registry import NEURAL_COMPONENTS, component, component_spec
from acestep_triton.text_tokenizer import TEXT_MAX_TOKENS
from acestep_triton.versions import TENSORRT_VERSION
from export.onnx_export import (
    ExportError,
    export_component,
    manifest_path,
)
from export.parity import ParityResult, compare_outputs
from export.progress import stage
from export.samples import PARITY_SIZES, Sizes, input_shapes, sample_inputs

# The components TensorRT builds (registry `plan`); the others stay on the python backend.
PLAN_COMPONENTS = tuple(name for name in NEURAL_COMPONENTS if component(name).plan)
PRECISIONS = ("bf16", "fp16", "fp32")
# Bound on the engine vs float32 PyTorch error (TF32 is on in fp32 builds). Starting points,
# not yet measured: this code has not run against TensorRT (see docs/export.md).
ENGINE_RTOL = {"fp32": 1e-3, "fp16": 3e-2, "bf16": 6e-2}


class TensorRTError(RuntimeError):
    """TensorRT is missing, of another version than pinned, or could not build; the message says what to do."""


@dataclass(frozen=True)
class EngineShapes:
    """The shape ranges engines are built for; `tag()` names them in the engine file."""

    durations_s: tuple[float, ...] = (30.0, 60.0, 120.0, MAX_DURATION_S)
    max_lyric_tokens: int = 4096
    # None: the spec's max_batch_size (what Triton's config declares); lower it to bound memory
    max_batch: int | None = None
    opt_batch: int = 2  # one seed, cond + uncond
    opt_text_tokens: int = 64
    opt_lyric_tokens: int = 512

    def __post_init__(self) -> None:
        d = self.durations_s
        if not d or list(d) != sorted(set(d)) or d[0] <= 0 or d[-1] > MAX_DURATION_S:
            raise ValueError(f"durations_s: need ascending distinct seconds in (0, {MAX_DURATION_S:g}], got {list(d)}")
        for name in ("max_lyric_tokens", "opt_batch", "opt_text_tokens", "opt_lyric_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {self.max_batch}")

    def tag(self) -> str:
        batch = "" if self.max_batch is None else f"_b{self.max_batch}"
        return f"d{'-'.join(f'{d:g}' for d in self.durations_s)}_l{self.max_lyric_tokens}{batch}"


Shapes = dict[str, tuple[int, ...]]


def optimisation_profiles(name: str, ckpt: Checkpoint, shapes: EngineShapes) -> list[dict[str, tuple]]:
    """[{input name: (min shape, opt shape, max shape)}], one dict per TensorRT optimisation profile."""
    spec = component_spec(name, ckpt)
    max_batch = spec.max_batch_size if shapes.max_batch is None else min(shapes.max_batch, spec.max_batch_size)
    max_lyric = shapes.max_lyric_tokens
    low = Sizes(batch=1, text_tokens=1, lyric_tokens=1, latent_frames=1)
    opt = Sizes(batch=min(shapes.opt_batch, max_batch), text_tokens=min(shapes.opt_text_tokens, TEXT_MAX_TOKENS),
                lyric_tokens=min(shapes.opt_lyric_tokens, max_lyric), latent_frames=1)
    high = Sizes(batch=max_batch, text_tokens=TEXT_MAX_TOKENS, lyric_tokens=max_lyric, latent_frames=1)
    has_frames = input_shapes(name, ckpt, low) != input_shapes(name, ckpt, replace(low, latent_frames=2))
    buckets = [latent_geometry(ckpt).frames(d) for d in shapes.durations_s] if has_frames else [1]
    profiles, previous = [], 0
    for frames in buckets:
        shapes = [input_shapes(name, ckpt, replace(s, latent_frames=f))
                  for s, f in ((low, previous + 1), (opt, frames), (high, frames))]
        profiles.append({k: (shapes[0][k], shapes[1][k], shapes[2][k]) for k in shapes[0]})
        previous = frames
    return profiles


def require_tensorrt():
    """The `tensorrt` module, checked against the pinned version; TensorRTError says what to do otherwise."""
    try:
        import tensorrt as trt
    except ImportError as error:
        raise TensorRTError(
            f"TensorRT is not importable here ({error}). Engines are built inside the NGC Triton image "
            f"pinned in versions.env, which has it and a GPU: see docker/README.md (ACESTEP_PROFILE=tensorrt)"
        ) from None
    if not trt.__version__.startswith(TENSORRT_VERSION):
        raise TensorRTError(
            f"TensorRT {trt.__version__} is installed but versions.env pins {TENSORRT_VERSION}; a plan only loads "
            f"in the TensorRT that built it, so build with the Triton image's version (or update the pin and image)"
        )
    return trt


def engine_path(out_dir: str | os.PathLike, name: str, trt_version: str, precision: str,
                shapes: EngineShapes) -> Path:
    """`<out>/<name>.trt<version>.<precision>.<shapes tag>.plan`."""
    return Path(out_dir) / f"{name}.trt{trt_version}.{precision}.{shapes.tag()}.plan"


def engine_manifest(engine: Path) -> Path:
    """`<engine>.json`: what the engine was built from and for, its optimisation profiles included."""
    return engine.with_name(engine.name + ".json")


def _onnx_fingerprint(onnx_dir: Path, name: str) -> str:
    return hashlib.sha256(json.dumps(json.loads(manifest_path(onnx_dir, name).read_text())["fingerprint"],
                                     sort_keys=True).encode()).hexdigest()


def _progress_monitor(trt, label: str):
    """Prints TensorRT's top-level build phases with their durations."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.started: dict[str, float] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                self.started[phase_name] = time.perf_counter()
                print(f"{label}: {phase_name} ({num_steps} steps)", flush=True)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True

        def phase_finish(self, phase_name: str) -> None:
            if phase_name in self.started:
                print(f"{label}: {phase_name} done in {time.perf_counter() - self.started.pop(phase_name):.1f} s",
                      flush=True)

    return Monitor()


def _build(trt, onnx_file: Path, profiles: list[dict[str, tuple]], precision: str, cache_file: Path,
           label: str) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    with stage(f"{label}: parse {onnx_file.name}"):
        parsed = parser.parse_from_file(str(onnx_file))  # from the file, so external data is found beside it
    if not parsed:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"{label}: TensorRT's ONNX parser rejected {onnx_file}: {errors}")
    config = builder.create_builder_config()
    if precision != "fp32":
        config.set_flag(trt.BuilderFlag.BF16 if precision == "bf16" else trt.BuilderFlag.FP16)
    for shapes in profiles:
        optimisation = builder.create_optimization_profile()
        for tensor, (low, opt, high) in shapes.items():
            optimisation.set_shape(tensor, low, opt, high)
        config.add_optimization_profile(optimisation)
    timing_cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    monitor = _progress_monitor(trt, label)
    config.progress_monitor = monitor
    with stage(f"{label}: build ({precision}, {len(profiles)} profile(s))"):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"{label}: TensorRT could not build an engine from {onnx_file} (see its log above)")
    _write_atomic(cache_file, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _torch_dtype(trt, dtype):
    import torch

    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}[dtype]


def run_engine(trt, engine_bytes: bytes, inputs: dict) -> dict:
    """One inference of a serialized engine on CUDA torch tensors -> {output name: float32 tensor}."""
    import torch

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_bytes)
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()

    def fits(index: int) -> bool:
        for name, value in inputs.items():
            low, _, high = engine.get_tensor_profile_shape(name, index)
            if not all(lo <= size <= hi for lo, size, hi in zip(low, value.shape, high)):
                return False
        return True

    index = next((i for i in range(engine.num_optimization_profiles) if fits(i)), None)
    if index is None:
        raise TensorRTError(f"inputs {[list(v.shape) for v in inputs.values()]} fit none of the engine's profiles")
    context.set_optimization_profile_async(index, stream.cuda_stream)
    keep = []
    for name, value in inputs.items():
        dtype = _torch_dtype(trt, engine.get_tensor_dtype(name))
        tensor = value.to("cuda", dtype).contiguous()
        keep.append(tensor)
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())

    class Outputs(trt.IOutputAllocator):
        """Allocates each output once TensorRT knows its size (the vocoder's length is computed in-graph)."""

        def __init__(self) -> None:
            trt.IOutputAllocator.__init__(self)
            self.buffers: dict[str, torch.Tensor] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def reallocate_output_async(self, tensor_name, memory, size, alignment, cuda_stream):
            self.buffers[tensor_name] = torch.empty(max(size, 1), dtype=torch.uint8, device="cuda")
            return self.buffers[tensor_name].data_ptr()

        def reallocate_output(self, tensor_name, memory, size, alignment):
            return self.reallocate_output_async(tensor_name, memory, size, alignment, None)

        def notify_shape(self, tensor_name, shape):
            self.shapes[tensor_name] = tuple(shape)

    allocator = Outputs()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    for name in outputs:
        context.set_output_allocator(name, allocator)
    if not context.execute_async_v3(stream.cuda_stream):
        raise TensorRTError("execute_async_v3 failed")
    stream.synchronize()
    results = {}
    for name in outputs:
        dtype = _torch_dtype(trt, engine.get_tensor_dtype(name))
        shape = allocator.shapes[name]
        count = math.prod(shape)
        results[name] = allocator.buffers[name][: count * dtype.itemsize].view(dtype).reshape(shape).float()
    return results


def check_engine(trt, engine_bytes: bytes, name: str, ckpt: Checkpoint) -> ParityResult:
    """The engine vs the float32 PyTorch component on CUDA, on fresh inputs at PARITY_SIZES."""
    import torch

    from acestep_triton.engines import TorchEngine

    spec = component_spec(name, ckpt)
    inputs = sample_inputs(name, ckpt, PARITY_SIZES, seed=1)
    reference = TorchEngine.load(name, ckpt, device="cuda", dtype=torch.float32).run(inputs)
    got = run_engine(trt, engine_bytes, inputs)
    torch.cuda.empty_cache()
    return compare_outputs(spec, {k: v.cpu() for k, v in reference.items()}, {k: v.cpu() for k, v in got.items()},
                           inputs)


def build_engine(name: str, ckpt: Checkpoint | str | os.PathLike, onnx_dir: str | os.PathLike,
                 out_dir: str | os.PathLike, precision: str = "bf16", shapes: EngineShapes = EngineShapes(),
                 force: bool = False, check: bool = True) -> Path:
    """The engine for one component (exporting its ONNX graph first if needed); cached, see the module docstring."""
    if name not in PLAN_COMPONENTS:
        raise ValueError(f"{name!r} is not built by TensorRT; the plan components are {', '.join(PLAN_COMPONENTS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    trt = require_tensorrt()
    ckpt = ckpt if isinstance(ckpt, Checkpoint) else validate_checkpoint(ckpt)
    onnx_dir, out = Path(onnx_dir), Path(out_dir)
    onnx_file = export_component(name, ckpt, onnx_dir)
    target = engine_path(out, name, trt.__version__, precision, shapes)
    manifest = engine_manifest(target)
    profiles = optimisation_profiles(name, ckpt, shapes)
    recorded = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if (target.is_file() and not force and recorded.get("onnx_fingerprint") == _onnx_fingerprint(onnx_dir, name)
            and recorded.get("profiles") == json.loads(json.dumps(profiles))):
        print(f"tensorrt {name}: cached at {target} (--force rebuilds)")
        return target
    label = f"tensorrt {name}"
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    engine_bytes = _build(trt, onnx_file, profiles, precision, out / f"timing.trt{trt.__version__}.cache", label)
    report = {}
    if check:
        with stage(f"{label}: load + one inference vs PyTorch"):
            parity = check_engine(trt, engine_bytes, name, ckpt)
        print(f"{label}: {parity.describe()}")
        if not parity.max_error <= ENGINE_RTOL[precision]:
            raise TensorRTError(f"{label}: engine differs from PyTorch beyond {ENGINE_RTOL[precision]:g} "
                                f"({precision}): {parity.describe()}")
        report = {"parity": parity.errors}
    manifest.unlink(missing_ok=True)
    _write_atomic(target, engine_bytes)
    manifest.write_text(json.dumps({
        "component": name, "tensorrt": trt.__version__, "precision": precision, "shapes": asdict(shapes),
        "profiles": profiles, "onnx_fingerprint": _onnx_fingerprint(onnx_dir, name),
        "seconds": round(time.perf_counter() - start, 1), **report,
    }, indent=2) + "\n")
    print(f"{label}: wrote {target} ({len(engine_bytes) / 1e6:.1f} MB)")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.tensorrt_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (published layout)")
    parser.add_argument("--onnx-dir", required=True, type=Path, help="ONNX exports (made here when missing)")
    parser.add_argument("--out", required=True, type=Path, help="directory for the engines and the timing cache")
    parser.add_argument("--components", nargs="+", choices=PLAN_COMPONENTS, default=list(PLAN_COMPONENTS),
                        metavar="NAME", help=f"components to build (default: all of {', '.join(PLAN_COMPONENTS)})")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    defaults = EngineShapes()
    parser.add_argument("--durations", nargs="+", type=float, default=list(defaults.durations_s),
                        help="duration buckets in seconds, one optimisation profile each")
    parser.add_argument("--max-lyric-tokens", type=int, default=defaults.max_lyric_tokens)
    parser.add_argument("--max-batch", type=int, default=None, help="cap the batch below the spec's max_batch_size")
    parser.add_argument("--force", action="store_true", help="rebuild even when a matching engine exists")
    parser.add_argument("--no-check", action="store_true", help="skip the engine vs PyTorch inference")
    args = parser.parse_args(argv)
    try:
        shapes = EngineShapes(tuple(args.durations), args.max_lyric_tokens, args.max_batch)
    except ValueError as error:
        parser.error(str(error))
    try:
        for name in args.components:
            build_engine(name, args.checkpoint, args.onnx_dir, args.out, args.precision, shapes, args.force,
                         not args.no_check)
    except (CheckpointError, ExportError, TensorRTError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
