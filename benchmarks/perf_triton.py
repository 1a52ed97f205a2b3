"""perf_analyzer against `acestep` and `dit_step`, one command, results written with machine, date and command.

    .venv/bin/python -m benchmarks.perf_triton --checkpoint ../shared/golden/tiny-ckpt \
        --lyric-vocab ../shared/golden/lyric_vocab.json --profile cpu --concurrency 1:2

Builds the model repository, starts tritonserver on free loopback ports, writes the input-data
JSON files (benchmarks/perf_inputs/, derived from the component specs and the checkpoint's
configs), runs perf_analyzer on both models and appends a section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from acestep_triton.checkpoint import validate_checkpoint
from acestep_triton.contract import ENSEMBLE_NAME, GenerationParams
from acestep_triton.sampling.seeds import latent_frames
from acestep_triton.ensemble_client import input_arrays
from acestep_triton.registry import component_spec
from acestep_triton.tritonserver import TritonServer
from benchmarks.perf_analyzer import parse_concurrency, run_perf_analyzer
from export.build_repository import build_repository

HERE = Path(__file__).resolve().parent
INPUTS_DIR = HERE / "perf_inputs"
RESULTS = HERE / "RESULTS.md"

# Slow models (seconds per request on CPU) need windows counted in requests, not milliseconds.
COUNT_WINDOWS = ["--measurement-mode", "count_windows", "--max-trials", "4", "--stability-percentage", "50"]
REQUEST = GenerationParams(
    prompt="pop, rock, electronic, upbeat, energetic",
    lyrics="[verse]\nWalking through the city streets at night\nLights are shining bright",
    audio_duration=5.0,
    infer_step=8,
    actual_seeds=(1234,),
)


def ensemble_input_data(params: GenerationParams) -> dict:
    """perf_analyzer JSON for the ensemble: one request of the contract's parameters."""
    entry = {}
    for name, array in input_arrays(params).items():
        values = [v.decode() if isinstance(v, bytes) else v.item() for v in array]
        entry[name] = {"content": values, "shape": list(array.shape)}
    return {"data": [entry]}


def dit_step_input_data(ckpt_dir: Path, duration_s: float, condition_tokens: int) -> dict:
    """perf_analyzer JSON for one dit_step row (perf_analyzer's -b sets how many rows a request has)."""
    spec = component_spec("dit_step", validate_checkpoint(ckpt_dir))
    frames = latent_frames(duration_s)
    entry = {}
    for tensor in spec.inputs:
        shape = [frames if d == -1 and i == len(tensor.dims) - 1 and tensor.name in ("LATENTS", "ATTENTION_MASK")
                 else condition_tokens if d == -1 else d for i, d in enumerate(tensor.dims)]
        count = 1
        for d in shape:
            count *= d
        fill = {"ATTENTION_MASK": 1.0, "ENCODER_MASK": 1.0, "TIMESTEP": 500.0, "Q_SCALE": 1.0}.get(tensor.name, 0.1)
        entry[tensor.name] = {"content": [fill] * count, "shape": shape}
    return {"data": [entry]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--lyric-vocab", type=Path)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--concurrency", default="1:2", type=parse_concurrency)
    parser.add_argument("--dit-batch", type=int, default=2, help="rows per dit_step request (guidance branches)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    INPUTS_DIR.mkdir(exist_ok=True)
    ensemble_json = INPUTS_DIR / "acestep.json"
    dit_json = INPUTS_DIR / "dit_step.json"
    ensemble_json.write_text(json.dumps(ensemble_input_data(REQUEST), indent=1) + "\n")
    dit_json.write_text(json.dumps(dit_step_input_data(args.checkpoint, REQUEST.audio_duration, 40)) + "\n")

    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(args.profile, args.checkpoint, Path(tmp) / "repo", args.lyric_vocab)
        with TritonServer(repo, log_path=Path(tmp) / "server.log", startup_timeout_s=900) as server:
            for model, data, extra in (
                (ENSEMBLE_NAME, ensemble_json, COUNT_WINDOWS + ["--measurement-request-count", "4"]),
                ("dit_step", dit_json, ["-b", str(args.dit_batch), *COUNT_WINDOWS,
                                        "--measurement-request-count", "20"]),
            ):
                result = run_perf_analyzer(model, server.grpc_url, data, args.concurrency, extra_args=extra,
                                           timeout_s=1800)
                reports[model] = (result.stdout + result.stderr).strip()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    command = "python -m benchmarks.perf_triton " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [
        f"\n## perf_analyzer, profile {args.profile}, checkpoint {args.checkpoint.name}",
        "",
        f"- date: {datetime.date.today().isoformat()}; machine: {platform.node()} ({platform.processor() or platform.machine()}, "
        f"CPU only); commit {commit}",
        f"- command: `{command}`",
        f"- request: {REQUEST.audio_duration:.0f} s audio, {REQUEST.infer_step} steps, {REQUEST.scheduler_type}/"
        f"{REQUEST.cfg_type}, ERG on; dit_step: {args.dit_batch} rows per request",
        "",
    ]
    for model, report in reports.items():
        lines += [f"### {model}", "", "```", report, "```", ""]
    with args.results.open("a") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
