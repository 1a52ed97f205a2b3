"""torch -> ONNX for the six neural components; each graph is checked against PyTorch before it is kept.

    python -m export.onnx_export --checkpoint DIR --out DIR [--components dit_step vocoder] [--force]

Artifacts, per component, in --out: `<name>.onnx` (plus `<name>.onnx.data` when the weights pass
EXTERNAL_DATA_BYTES, the protobuf limit being 2 GB) and `<name>.json`, the manifest, written last.
A component whose manifest matches the checkpoint folder, the code (GRAPH_CODE), opset and torch
version is skipped ("cached"); anything else is rebuilt and `--force` rebuilds regardless.

Each export: the component module (acestep_triton.components) in float32 on the CPU ->
torch.export with every batch and -1 axis of the spec dynamic -> ONNX (I/O named as the spec) ->
saved -> graph I/O checked against the spec -> loaded by ONNX Runtime and run once on fresh
inputs of other lengths than the export sample (a shape baked into the graph fails there), with
PyTorch on the same inputs; the export fails if the relative error passes the bound.

Exporter choice (torch 2.13): the torch.export-based exporter (`dynamo=True`) for all six. The
TorchScript exporter (`dynamo=False`) was tried first and fails four of them: dcae_decoder
(diffusers' `movedim(-1, 1)` becomes a Transpose with perm -1, which ONNX Runtime rejects),
vocoder (the 44.1 -> 48 kHz output length is computed in Python, so tracing bakes it in: wrong
length at any other input length), text_encoder (`torch.func.functional_call` is not traceable)
and dit_step (no `aten::rms_norm` symbolic). torch.export runs in strict (Dynamo) mode: non-strict
mode cannot keep the vocoder's length symbolic (it goes through `.item()`), and it runs the
modules' Python on fake tensors, so a Python-side cache (the lru_cache of
`audio.sinc_resample_kernel`) keeps a fake tensor that breaks every later eager call. The graph
is written without onnxscript's optimiser (`optimize=False`): in onnxscript 0.7.2 it drops the
`+ 1e-15` of the DCAE's linear attention denominator, turning 0/0 into NaN; ONNX Runtime and
TensorRT optimise the graph at load anyway.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from acestep_triton.checkpoint import Checkpoint, CheckpointError, validate_checkpoint
from acestep_triton.registry import NEURAL_COMPONENTS, component, component_spec
from acestep_triton.specs import ComponentSpec
from acestep_triton.versions import ONNX_OPSET
from export.graph_io import io_mismatches
from export.parity import PARITY_RTOL, ParityResult, compare_outputs
from export.progress import stage
from export.samples import EXPORT_SIZES, PARITY_SIZES, Sizes, sample_inputs

COMPONENTS = NEURAL_COMPONENTS
# torch's own switch to external data is at 1.5 GiB: room under protobuf's 2 GiB for the graph itself.
EXTERNAL_DATA_BYTES = 1536 * 1024**2
REPO_ROOT = Path(__file__).resolve().parents[1]
# The code that decides what a graph computes (the modules, and how they are exported); an edit
# there invalidates the exports.
GRAPH_CODE = ("acestep_triton/components.py", "acestep_triton/audio.py", "acestep_triton/specs.py",
              "acestep_triton/registry.py", "acestep_triton/models", "export/onnx_export.py", "export/samples.py")


class ExportError(RuntimeError):
    """An export did not produce a graph that matches its spec and PyTorch; the message says which and why."""


@dataclass(frozen=True)
class ExportReport:
    """What one export produced, as recorded in its manifest."""

    component: str
    onnx_bytes: int
    external_data: bool
    seconds: float
    parity: dict[str, float]
    parity_shapes: dict[str, list[int]]


def onnx_path(out_dir: str | os.PathLike, name: str) -> Path:
    return Path(out_dir) / f"{name}.onnx"


def manifest_path(out_dir: str | os.PathLike, name: str) -> Path:
    return Path(out_dir) / f"{name}.json"


def check_component_name(name: str) -> None:
    if name not in NEURAL_COMPONENTS:
        raise ValueError(f"unknown component {name!r}; the exportable components are {', '.join(COMPONENTS)}")


def _as_checkpoint(ckpt: Checkpoint | str | os.PathLike) -> Checkpoint:
    return ckpt if isinstance(ckpt, Checkpoint) else validate_checkpoint(ckpt)


def _sha256_files(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def fingerprint(name: str, ckpt: Checkpoint, opset: int) -> dict:
    """Everything an export depends on, cheap to compute (weights by size and mtime, not content)."""
    folder = ckpt.root / component(name).folder
    weights = sorted(folder.glob("*.safetensors"))
    code = sorted(p for entry in map(REPO_ROOT.joinpath, GRAPH_CODE)
                  for p in (entry.glob("*.py") if entry.is_dir() else [entry]))
    return {
        "component": name,
        "opset": opset,
        "torch": torch.__version__,
        "checkpoint": str(folder.resolve()),
        "config_sha256": _sha256_files([folder / "config.json"]),
        "weights": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in weights},
        "code_sha256": _sha256_files(code),
    }


def dynamic_shapes(spec: ComponentSpec) -> tuple[dict[int, object], ...]:
    """torch.export dynamic shapes: the batch axis and every -1 axis of each input, relations inferred."""
    auto = torch.export.Dim.AUTO
    return tuple({0: auto, **{i: auto for i, d in enumerate(t.dims, start=1) if d == -1}} for t in spec.inputs)


def _torch_export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], spec: ComponentSpec,
                  label: str) -> torch.export.ExportedProgram:
    """torch.export in strict (Dynamo) mode; see the module docstring for why not non-strict."""
    try:
        with stage(f"{label}: torch.export"):
            return torch.export.export(module, args, dynamic_shapes=dynamic_shapes(spec), strict=True)
    except Exception as error:  # noqa: BLE001 - any tracing failure is reported the same way
        raise ExportError(f"{spec.name}: torch.export failed: {type(error).__name__}: {str(error)[:2000]}") from error


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct parameters and buffers (shared ones counted once)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def check_parity(module: torch.nn.Module, spec: ComponentSpec, ckpt: Checkpoint, path: str | os.PathLike,
                 sizes: Sizes = PARITY_SIZES, seed: int = 1) -> ParityResult:
    """Load `path` in ONNX Runtime (CPU) and compare one inference with `module` on fresh inputs at `sizes`."""
    from acestep_triton.engines import TorchEngine
    from acestep_triton.onnx_engine import OnnxEngine

    inputs = sample_inputs(spec.name, ckpt, sizes, seed=seed)
    reference = TorchEngine(spec, module, torch.device("cpu"), torch.float32).run(inputs)
    exported = OnnxEngine.load(path, spec, device="cpu").run(inputs)
    return compare_outputs(spec, reference, exported, inputs)


def export_onnx(module: torch.nn.Module, spec: ComponentSpec, ckpt: Checkpoint, path: str | os.PathLike,
                opset: int = ONNX_OPSET, rtol: float = PARITY_RTOL) -> ExportReport:
    """Export `module` (float32, CPU, eval) to `path` and verify it; ExportError if the graph is wrong.

    `ckpt` gives the configs the sample inputs are sized from; its weights are not read here.
    """
    path = Path(path)
    label = f"onnx {spec.name}"
    start = time.perf_counter()
    args = tuple(sample_inputs(spec.name, ckpt, EXPORT_SIZES, seed=0).values())
    program = _torch_export(module, args, spec, label)
    with stage(f"{label}: translate to ONNX (opset {opset})"):
        onnx_program = torch.onnx.export(
            program, args, input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            opset_version=opset, dynamo=True, optimize=False, verbose=False,
        )
    external = parameter_bytes(module) > EXTERNAL_DATA_BYTES
    with stage(f"{label}: save{' (external data)' if external else ''}"):
        onnx_program.save(path, external_data=external)
    del onnx_program, program
    problems = io_mismatches(spec, path)
    if problems:
        raise ExportError(f"{spec.name}: the graph at {path} does not match the spec: " + "; ".join(problems))
    with stage(f"{label}: ONNX Runtime load + one inference vs PyTorch"):
        parity = check_parity(module, spec, ckpt, path)
    print(f"{label}: {parity.describe()}")
    if not parity.max_error <= rtol:
        raise ExportError(f"{spec.name}: ONNX Runtime differs from PyTorch beyond {rtol:g}: {parity.describe()}; "
                          f"the graph is left at {path}")
    data = path.with_name(path.name + ".data")
    size = path.stat().st_size + (data.stat().st_size if external else 0)
    return ExportReport(spec.name, size, external, round(time.perf_counter() - start, 1),
                        parity.errors, {k: list(v) for k, v in parity.shapes.items()})


def _stale_keys(manifest: Path, current: dict) -> list[str]:
    if not manifest.is_file():
        return ["no manifest"]
    try:
        recorded = json.loads(manifest.read_text()).get("fingerprint", {})
    except json.JSONDecodeError:
        return ["unreadable manifest"]
    return sorted(k for k in set(current) | set(recorded) if current.get(k) != recorded.get(k))


def export_component(name: str, ckpt: Checkpoint | str | os.PathLike, out_dir: str | os.PathLike,
                     opset: int = ONNX_OPSET, force: bool = False, rtol: float = PARITY_RTOL) -> Path:
    """Export one component of `ckpt` to `<out_dir>/<name>.onnx` (cached, see the module docstring)."""
    check_component_name(name)
    ckpt = _as_checkpoint(ckpt)
    out = Path(out_dir)
    target, manifest = onnx_path(out, name), manifest_path(out, name)
    current = fingerprint(name, ckpt, opset)
    stale = _stale_keys(manifest, current) if target.is_file() else ["no graph"]
    if not stale and not force:
        print(f"onnx {name}: cached at {target} (--force rebuilds)")
        return target
    if target.is_file():
        print(f"onnx {name}: rebuilding ({'--force' if force else 'changed: ' + ', '.join(stale)})")

    work = out / f".{name}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from acestep_triton.components import load_component

    with stage(f"onnx {name}: load {component(name).folder}/"):
        module = load_component(name, ckpt)
    report = export_onnx(module, component_spec(name, ckpt), ckpt, work / target.name, opset, rtol)
    del module

    manifest.unlink(missing_ok=True)
    for suffix in ("", ".data"):
        built, final = work / (target.name + suffix), out / (target.name + suffix)
        if built.is_file():
            os.replace(built, final)
        else:
            final.unlink(missing_ok=True)
    manifest.write_text(json.dumps({"fingerprint": current, "report": asdict(report)}, indent=2) + "\n")
    shutil.rmtree(work)
    print(f"onnx {name}: wrote {target} ({report.onnx_bytes / 1e6:.1f} MB) in {report.seconds:.1f} s")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.onnx_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (published layout)")
    parser.add_argument("--out", required=True, type=Path, help="directory for <component>.onnx and manifests")
    parser.add_argument("--components", nargs="+", choices=COMPONENTS, default=list(COMPONENTS), metavar="NAME",
                        help=f"components to export (default: all of {', '.join(COMPONENTS)})")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET,
                        help=f"ONNX opset (default {ONNX_OPSET}, from versions.env)")
    parser.add_argument("--rtol", type=float, default=PARITY_RTOL, help="bound on the ONNX Runtime vs PyTorch error")
    parser.add_argument("--force", action="store_true", help="rebuild even when a matching export exists")
    args = parser.parse_args(argv)
    try:
        for name in args.components:
            export_component(name, args.checkpoint, args.out, args.opset, args.force, args.rtol)
    except (CheckpointError, ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
