"""LoRA adapters on the GPU: parity on the golden cases, the gpu profile's adapter path, and its speed.

    python -m benchmarks.bench_lora --golden DIR --out DIR [--full-size]

1. tiny checkpoint, golden l1 (tiny-lora at 0.7) and l2 (base): float32 on CUDA against upstream's
   waveforms; then the gpu profile (bf16, compiled blocks, CUDA-graph decodes) against that float32
   run, base and LoRA requests interleaved on one pipeline (a base request after a LoRA one must be
   bit-identical to the one before: the graphs never hold an adapter).
2. tiny dit_step under the gpu profile: one batch of rows [adapter, adapter, base, base] against
   each kind alone (adapter rows run eagerly, the base rows through the graphs:
   acestep_triton.acceleration.BucketedDecode).
3. --full-size: dit_step decodes at the published size (random weights, 60 s) under the gpu profile:
   2 base rows (graph replay), the same eagerly, 2 rows with a random rank-64 adapter on every target
   layer (eager), and a batch of 2 adapter + 2 base rows.

Prints one line per measurement and writes results.json into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import save_file

from acestep_triton.acceleration import accelerate_engine
from acestep_triton.adapters import ADAPTER_FILE, AdapterSettings
from acestep_triton.checkpoint import TRANSFORMER_DIR, Checkpoint, validate_checkpoint
from acestep_triton.components import keep_parts
from acestep_triton.contract import NO_LORA, GenerationParams
from acestep_triton.engines import TorchEngine, load_engines
from acestep_triton.lora import AdapterStore, target_layers
from acestep_triton.models.transformer import ACEStepTransformer
from acestep_triton.pipeline import Text2MusicPipeline
from acestep_triton.registry import component, component_spec, resolve
from acestep_triton.sampling.seeds import latent_frames

FULL_SIZE_CONFIGS = Path(__file__).resolve().parent / "full_size_configs"
TINY = "tiny-lora"


def relative_l2(actual, reference) -> float:
    actual, reference = np.asarray(actual, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(actual - reference) / np.linalg.norm(reference))


def golden_case(golden: Path, case: str) -> tuple[GenerationParams, np.ndarray]:
    kw = dict(json.loads((golden / "ext" / f"{case}.json").read_text())["call_kwargs"])
    kw.pop("retake_seeds")
    kw["actual_seeds"] = tuple(kw.pop("manual_seeds"))
    kw["oss_steps"] = tuple(kw["oss_steps"] or ())
    kw["lora_name_or_path"] = NO_LORA if kw["lora_name_or_path"] == NO_LORA else TINY
    samples, _ = sf.read(golden / "ext" / f"{case}.wav", dtype="float32", always_2d=True)
    return GenerationParams(**kw), samples.T


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def tiny_pipelines(golden: Path) -> dict:
    ckpt, vocab, settings = golden / "tiny-ckpt", golden / "lyric_vocab.json", AdapterSettings(golden, hub=False)
    cases = {case: golden_case(golden, case) for case in ("l1_lora_w07", "l2_lora_unloaded")}
    results: dict = {}
    fp32 = Text2MusicPipeline.from_checkpoint(ckpt, vocab, device="cuda", dtype=torch.float32, adapters=settings)
    reference = {}
    for case, (params, golden_wave) in cases.items():
        reference[case] = fp32(params).waveforms[0]
        err = float(np.abs(reference[case] - golden_wave).max())
        results[f"fp32_cuda_{case}_max_abs_vs_upstream"] = err
        print(f"float32 cuda {case}: max abs error against upstream {err:.2e}", flush=True)
    del fp32
    gpu = Text2MusicPipeline.from_checkpoint(ckpt, vocab, device="cuda", dtype=torch.bfloat16, accelerate=True,
                                             adapters=settings)
    seen: dict[str, list[np.ndarray]] = {case: [] for case in cases}
    for case in ("l2_lora_unloaded", "l1_lora_w07", "l2_lora_unloaded", "l1_lora_w07"):
        result, seconds = timed(lambda: gpu(cases[case][0]))
        wave = result.waveforms[0]
        seen[case].append(wave)
        err = relative_l2(wave, reference[case])
        print(f"gpu profile {case}: {seconds:.3f} s, relative L2 against float32 {err:.2e}", flush=True)
        results.setdefault(f"gpu_{case}_relative_l2_vs_fp32", []).append(err)
        results.setdefault(f"gpu_{case}_seconds", []).append(seconds)
    for case, waves in seen.items():
        results[f"gpu_{case}_repeat_bit_identical"] = bool(np.array_equal(waves[0], waves[1]))
    results["gpu_lora_vs_base_relative_l2"] = relative_l2(seen["l1_lora_w07"][0], seen["l2_lora_unloaded"][0])
    print(f"gpu profile: repeats bit-identical {[results[f'gpu_{c}_repeat_bit_identical'] for c in cases]}, "
          f"LoRA vs base relative L2 {results['gpu_lora_vs_base_relative_l2']:.2e}", flush=True)
    return results


def dit_batch(config, rows: int, frames: int, tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    one = {"LATENTS": torch.randn(1, config.in_channels, config.max_height, frames, generator=g),
           "ATTENTION_MASK": torch.ones(1, frames), "ENCODER_STATES": torch.randn(1, tokens, config.inner_dim, generator=g),
           "ENCODER_MASK": torch.ones(1, tokens), "TIMESTEP": torch.full((1, 1), 700.0), "Q_SCALE": torch.ones(1, 1)}
    return {k: v.expand(rows, *v.shape[1:]).contiguous() for k, v in one.items()}


def mixed_batch(golden: Path) -> dict:
    engine = load_engines(["dit_step"], validate_checkpoint(golden / "tiny-ckpt"), "cuda", torch.bfloat16, True,
                          AdapterSettings(golden, hub=False))["dit_step"]
    store, config = engine.adapters, engine.module.transformer.config
    inputs = dit_batch(config, 4, latent_frames(2.0), 128)

    def rows(names, weights):
        return store.request_rows(names, torch.tensor(weights))

    mixed = engine.run({**inputs, **rows([TINY, TINY, NO_LORA, NO_LORA], [0.7, 0.7, 1.0, 1.0])})["VELOCITY"]
    base = engine.run({k: v[2:] for k, v in inputs.items()})["VELOCITY"]
    adapted = engine.run({**inputs, **rows([TINY] * 4, [0.7] * 4)})["VELOCITY"]
    out = {"base_rows_bit_identical_to_a_base_batch": float(torch.equal(mixed[2:], base)),
           "adapter_rows_relative_l2_vs_all_adapter_batch": relative_l2(mixed[:2].cpu(), adapted[:2].cpu()),
           "adapter_vs_base_relative_l2": relative_l2(adapted[2:].cpu(), base.cpu())}
    print(f"mixed batch (gpu profile): {json.dumps({k: f'{v:.2e}' for k, v in out.items()})}", flush=True)
    return out


def full_size(tmp: Path, rank: int = 64, runs: int = 5) -> dict:
    """One 60 s decode of 2 rows at the published size: graphed base against an eager adapter batch."""
    ckpt = Checkpoint(FULL_SIZE_CONFIGS)
    torch.manual_seed(0)
    with torch.device("cuda"):
        transformer = ACEStepTransformer.from_config(ACEStepTransformer.load_config(FULL_SIZE_CONFIGS / TRANSFORMER_DIR))
    g = torch.Generator().manual_seed(1)
    factors = {}
    for path, layer in target_layers(transformer).items():
        factors[f"{path}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=g) / layer.in_features**0.5
        factors[f"{path}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.01
    (tmp / "adapters" / "random").mkdir(parents=True, exist_ok=True)
    save_file(factors, str(tmp / "adapters" / "random" / ADAPTER_FILE), metadata={"format": "pt"})
    keep_parts(transformer, ["dit_step"])
    module = resolve(component("dit_step").module)(transformer).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    store = AdapterStore(transformer, AdapterSettings(tmp / "adapters", hub=False), torch.device("cuda"), torch.bfloat16)
    engine = TorchEngine(component_spec("dit_step", ckpt), module, torch.device("cuda"), torch.bfloat16, store)
    _, warm = timed(lambda: accelerate_engine("dit_step", engine))
    inputs = dit_batch(transformer.config, 2, latent_frames(60.0), 512)
    four = dit_batch(transformer.config, 4, latent_frames(60.0), 512)
    adapter_rows = store.request_rows(["random", "random"], torch.tensor([1.0, 1.0]))
    mixed_rows = store.request_rows(["random", "random", NO_LORA, NO_LORA], torch.ones(4))
    args = [inputs[t.name].to("cuda", torch.bfloat16) for t in engine.spec.inputs]

    def base_eager():
        with torch.inference_mode(), torch.compiler.set_stance("force_eager"):
            return transformer.decode(*args[:4], args[4][:, 0], args[5][:, 0])

    results = {"rank": rank, "accelerate_s": warm, "adapter_mib": sum(t.nbytes for t in factors.values()) / 2 / 2**20}
    for label, call in (("base_graphed_2rows", lambda: engine.run(inputs)), ("base_eager_2rows", base_eager),
                        ("adapter_2rows", lambda: engine.run({**inputs, **adapter_rows})),
                        ("adapter_2_base_2", lambda: engine.run({**four, **mixed_rows}))):
        call()
        results[f"{label}_decode_s"] = statistics.median(timed(call)[1] for _ in range(runs))
    results["adapter_over_base"] = results["adapter_2rows_decode_s"] / results["base_graphed_2rows_decode_s"]
    print(f"full size, 60 s, 2 rows: {json.dumps({k: round(v, 4) for k, v in results.items()})}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--golden", type=Path, required=True, help="the golden data folder (tiny-ckpt, tiny-lora, ext)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--full-size", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "tiny": tiny_pipelines(args.golden), "mixed_batch": mixed_batch(args.golden)}
    if args.full_size:
        with tempfile.TemporaryDirectory() as tmp:
            results["full_size"] = full_size(Path(tmp))
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
