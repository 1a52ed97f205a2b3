"""Run Triton's `perf_analyzer` from the `tritonclient[all]` wheel.

The wheel installs the binary into the venv's `bin/`; it links `libcudart.so.12`
(PyPI `nvidia-cuda-runtime-cu12`, put on LD_LIBRARY_PATH here, even on CPU-only
hosts) and Debian's `libb64.so.0d` (`scripts/install_system_deps.sh`).

    python -m benchmarks.perf_analyzer -m dit_step -u localhost:8011 \
        --input-data dit_step.json --concurrency 1:4:1 [-- extra perf_analyzer args]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer, or a library it needs, is missing, or the run failed."""


def locate_perf_analyzer() -> Path:
    """The perf_analyzer binary of this venv (tritonclient wheel), else the one on PATH."""
    candidate = Path(sys.prefix) / "bin" / "perf_analyzer"
    if candidate.is_file():
        return candidate
    found = shutil.which("perf_analyzer")
    if found is None:
        raise PerfAnalyzerError(f"perf_analyzer not in {candidate.parent} nor on PATH (pip install tritonclient[all])")
    return Path(found)


def cuda_runtime_lib_dir() -> Path:
    """Directory holding libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel."""
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    for location in (spec.submodule_search_locations or []) if spec else []:
        lib_dir = Path(location) / "lib"
        if (lib_dir / "libcudart.so.12").is_file():
            return lib_dir
    raise PerfAnalyzerError("libcudart.so.12 not found: pip install nvidia-cuda-runtime-cu12")


def perf_analyzer_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment with libcudart.so.12 on LD_LIBRARY_PATH."""
    env = dict(os.environ if base is None else base)
    paths = [str(cuda_runtime_lib_dir())] + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
    return env


def parse_concurrency(text: str) -> tuple[int, int, int]:
    """'4' -> (4, 4, 1); '1:8' -> (1, 8, 1); '1:8:2' -> (1, 8, 2)."""
    parts = [int(p) for p in text.split(":")]
    if not 1 <= len(parts) <= 3 or any(p < 1 for p in parts):
        raise ValueError(f"concurrency: expected start[:end[:step]] of positive integers, got {text!r}")
    start = parts[0]
    end = parts[1] if len(parts) > 1 else start
    step = parts[2] if len(parts) > 2 else 1
    return start, end, step


def perf_analyzer_command(
    model: str,
    url: str,
    input_data: Path,
    concurrency: tuple[int, int, int] = (1, 1, 1),
    protocol: str = "grpc",
    csv_path: Path | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The perf_analyzer command line for one model over a concurrency range."""
    if protocol not in ("grpc", "http"):
        raise ValueError(f"protocol: must be 'grpc' or 'http', got {protocol!r}")
    start, end, step = concurrency
    cmd = [
        str(locate_perf_analyzer()),
        "-m", model,
        "-u", url,
        "-i", protocol,
        "--input-data", str(input_data),
        "--concurrency-range", f"{start}:{end}:{step}",
    ]
    if csv_path is not None:
        cmd += ["-f", str(csv_path)]
    return cmd + list(extra_args)


def run_perf_analyzer(
    model: str,
    url: str,
    input_data: Path,
    concurrency: tuple[int, int, int] = (1, 1, 1),
    protocol: str = "grpc",
    csv_path: Path | None = None,
    extra_args: Sequence[str] = (),
    timeout_s: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run perf_analyzer and capture its report; PerfAnalyzerError with its output if it fails."""
    cmd = perf_analyzer_command(model, url, input_data, concurrency, protocol, csv_path, extra_args)
    result = subprocess.run(cmd, env=perf_analyzer_environment(), capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-4000:]
        raise PerfAnalyzerError(f"perf_analyzer exited with {result.returncode} for model {model}:\n{output}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: perf_analyzer for one model; arguments after `--` go to perf_analyzer unchanged."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf_analyzer", description=main.__doc__)
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("-u", "--url", required=True, help="host:port of Triton's gRPC (or HTTP) endpoint")
    parser.add_argument("--input-data", type=Path, required=True, help="perf_analyzer input JSON")
    parser.add_argument("--concurrency", type=parse_concurrency, default=(1, 1, 1), help="start[:end[:step]]")
    parser.add_argument("-i", "--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--csv", type=Path, default=None, help="write perf_analyzer's CSV report here")
    args = parser.parse_args(argv)
    cmd = perf_analyzer_command(args.model, args.url, args.input_data, args.concurrency, args.protocol, args.csv, extra)
    return subprocess.call(cmd, env=perf_analyzer_environment())


if __name__ == "__main__":
    sys.exit(main())
