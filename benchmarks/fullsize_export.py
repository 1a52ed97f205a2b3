"""The ONNX export of components at their published size, with seeded random weights: time, size, parity.

    python -m benchmarks.fullsize_export --out DIR [--components dcae_decoder vocoder text_encoder]
        [--configs benchmarks/full_size_configs] [--duration 10]

Weights cannot be downloaded here and the export does not depend on their values, so each
component is built from its published config.json with seeded random init (float32, CPU) and
exported by export.onnx_export.export_onnx: torch.export, ONNX, save (external data past 1.5 GiB),
graph I/O vs spec, ONNX Runtime vs PyTorch on fresh inputs of other shapes. Then, for the record,
ONNX Runtime's load time and one inference at --duration seconds of audio (prompt and lyric
lengths of a typical request) beside PyTorch's. The transformer is built on the meta device and
pruned to the part the component runs before it gets memory, so condition_encoder needs ~1 GB;
dit_step needs ~13 GB of weights and about 3x that in all (a GPU host's RAM, not a laptop's).
Run one component per invocation for its own peak RSS. Results: <out>/fullsize_export.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from acestep_triton.checkpoint import DCAE_DIR, TEXT_ENCODER_DIR, TRANSFORMER_DIR, VOCODER_DIR, Checkpoint
from acestep_triton.components import keep_parts
from acestep_triton.sampling.seeds import latent_frames
from acestep_triton.registry import component, component_spec, resolve
from acestep_triton.versions import ONNX_OPSET
from export.onnx_export import COMPONENTS, export_onnx, parameter_bytes
from export.progress import stage
from export.samples import Sizes, sample_inputs

HERE = Path(__file__).resolve().parent
FULL_SIZE_CONFIGS = HERE / "full_size_configs"
WEIGHT_SEED = 0
# A typical request: one seed with its unconditional branch, a short prompt, a verse or two of lyrics.
TYPICAL = {"batch": 2, "text_tokens": 40, "lyric_tokens": 300}


def _random_init(module: torch.nn.Module, seed: int) -> None:
    """Seeded init of a module materialised from meta: each layer's own reset_parameters, N(0, 0.02) for the rest."""
    torch.manual_seed(seed)
    covered = set()
    for layer in module.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
            covered |= {id(p) for p in layer.parameters(recurse=False)}
    for parameter in module.parameters():
        if id(parameter) not in covered:
            torch.nn.init.normal_(parameter, std=0.02)


def build_module(name: str, configs: Path, seed: int = WEIGHT_SEED) -> torch.nn.Module:
    """Component `name` at the size of `configs`, float32 on the CPU, seeded random weights."""
    torch.manual_seed(seed)
    if name in ("condition_encoder", "dit_step"):
        from acestep_triton.models.transformer import ACEStepTransformer

        with torch.device("meta"):
            model = ACEStepTransformer.from_config(ACEStepTransformer.load_config(configs / TRANSFORMER_DIR))
        keep_parts(model, [name])
        model.to_empty(device="cpu")
        _random_init(model, seed)
    elif name == "text_encoder":
        from transformers import UMT5Config, UMT5EncoderModel

        from acestep_triton.models.text_encoder import TextEncoder

        umt5 = UMT5EncoderModel(UMT5Config.from_json_file(configs / TEXT_ENCODER_DIR / "config.json"))
        model = TextEncoder(umt5.eval(), tokenizer=None)
    elif name == "dcae_decoder":
        from diffusers import AutoencoderDC

        model = AutoencoderDC.from_config(AutoencoderDC.load_config(configs / DCAE_DIR)).eval()
    elif name == "vocoder":
        from acestep_triton.models.vocoder import ADaMoSHiFiGAN

        model = ADaMoSHiFiGAN.from_config(ADaMoSHiFiGAN.load_config(configs / VOCODER_DIR)).eval()
    else:
        raise ValueError(f"unknown component {name!r}; choose from {', '.join(COMPONENTS)}")
    return resolve(component(name).module)(model).float().eval().requires_grad_(False)


def _timed(fn) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def export_full_size(name: str, configs: Path, out: Path, duration_s: float) -> dict:
    """Build, export and verify one component; then time ORT load and one inference beside PyTorch."""
    from acestep_triton.engines import TorchEngine
    from acestep_triton.onnx_engine import OnnxEngine
    from export.parity import compare_outputs

    ckpt = Checkpoint(configs)  # configs only: the specs and sample inputs read nothing else
    spec = component_spec(name, ckpt)
    with stage(f"{name}: build at full size (random weights)"):
        module, build_s = _timed(lambda: build_module(name, configs))
    params = sum(p.numel() for p in module.parameters())
    report = export_onnx(module, spec, ckpt, out / f"{name}.onnx", ONNX_OPSET)

    sizes = Sizes(latent_frames=latent_frames(duration_s), **TYPICAL)
    inputs = sample_inputs(name, ckpt, sizes, seed=2)
    engine, load_s = _timed(lambda: OnnxEngine.load(out / f"{name}.onnx", spec))
    with stage(f"{name}: ONNX Runtime inference at {duration_s:g} s"):
        exported, ort_s = _timed(lambda: engine.run(inputs))
    with stage(f"{name}: PyTorch inference at {duration_s:g} s"):
        reference, torch_s = _timed(lambda: TorchEngine(spec, module, torch.device("cpu"), torch.float32).run(inputs))
    typical = compare_outputs(spec, reference, exported, inputs)
    print(f"{name}: at {duration_s:g} s: {typical.describe()}")
    return {
        "component": name,
        "parameters": params,
        "parameter_bytes": parameter_bytes(module),
        "build_s": round(build_s, 1),
        "export": asdict(report),
        "ort_load_s": round(load_s, 2),
        "typical_inputs": {k: list(v.shape) for k, v in inputs.items()},
        "ort_inference_s": round(ort_s, 3),
        "torch_inference_s": round(torch_s, 3),
        "typical_relative_error": typical.errors,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fullsize_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--components", nargs="+", choices=COMPONENTS, default=list(COMPONENTS), metavar="NAME")
    parser.add_argument("--configs", type=Path, default=FULL_SIZE_CONFIGS, help="folder of the four config.json")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of audio for the timed inference")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "fullsize_export.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for name in args.components:
        record = export_full_size(name, args.configs, args.out, args.duration)
        import onnx
        import onnxruntime

        record["host"] = {"cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
        results[name] = record
        results_file.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
