"""`make serve`: checkpoint -> model repository -> tritonserver -> REST gateway, in the foreground.

    python -m acestep_triton.serve --profile cpu --checkpoint "" --port 8000 --outputs outputs \
        --triton-http-port 8010 --triton-grpc-port 8011 --triton-metrics-port 8012 --adapters-dir ""

An empty --checkpoint serves the tiny random checkpoint (built once into the
cache, ACESTEP_CACHE or ~/.cache/acestep_triton). The model repository for the
profile is generated into --repository-dir. Triton listens on loopback, kept
serving by acestep_triton.supervisor (restarted when it exits, a model reloaded
when one of its stubs dies); the gateway (gateway.server.GatewayServer) talks
gRPC to it and answers 503 while Triton recovers. Ctrl-C or SIGTERM drains the
gateway (running generations finish, up to ACESTEP_SHUTDOWN_DEADLINE_S), then
stops Triton; the exit status is then 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from acestep_triton.supervisor import Supervisor
from acestep_triton.tritonserver import REPO_ROOT, TritonServer, run_in_foreground


def resolve_checkpoint(checkpoint: str) -> Path:
    """The checkpoint directory to serve: the given one (validated) or the cached tiny one."""
    from acestep_triton.checkpoint import validate_checkpoint

    if checkpoint:
        return validate_checkpoint(checkpoint).root
    from acestep_triton.tiny import tiny_checkpoint

    return tiny_checkpoint().root


def gateway_environment(
    checkpoint: Path, triton: TritonServer, outputs: Path, host: str, port: int, precision: str
) -> dict[str, str]:
    """ACESTEP_* variables for `gateway.settings.Settings.from_env`; the profile's precision
    unless ACESTEP_PRECISION is already set."""
    env = dict(os.environ)
    env.setdefault("ACESTEP_PRECISION", precision)
    env.update(
        ACESTEP_CHECKPOINT_PATH=str(checkpoint),
        ACESTEP_TRITON_URL=triton.grpc_url,
        ACESTEP_TRITON_PROTOCOL="grpc",
        ACESTEP_OUTPUTS_DIR=str(outputs),
        ACESTEP_HOST=host,
        ACESTEP_PORT=str(port),
    )
    return env


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the REST API backed by a real tritonserver until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m acestep_triton.serve", description=main.__doc__)
    parser.add_argument("--profile", default="cpu", help="export.build_repository profile: cpu, gpu, onnx, lowvram")
    parser.add_argument("--checkpoint", default="", help="checkpoint directory; empty: the tiny random checkpoint")
    parser.add_argument("--adapters-dir", default="", help="LoRA adapters directory (one folder per adapter); "
                        "empty: $ACESTEP_ADAPTERS_DIR, or none")
    parser.add_argument("--host", default="0.0.0.0", help="gateway bind address")
    parser.add_argument("--port", type=int, default=8000, help="gateway port")
    parser.add_argument("--outputs", type=Path, default=Path("outputs"))
    parser.add_argument("--repository-dir", type=Path, default=None,
                        help="where the model repository is generated (default: build/model_repository/<profile>)")
    parser.add_argument("--triton-http-port", type=int, default=8010)
    parser.add_argument("--triton-grpc-port", type=int, default=8011)
    parser.add_argument("--triton-metrics-port", type=int, default=8012)
    parser.add_argument("--triton-log", type=Path, default=None, help="tritonserver log file (default: a temp file)")
    parser.add_argument("--triton-log-verbose", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds for Triton to load all models")
    args = parser.parse_args(argv)

    import torch

    from export.build_repository import PROFILES, build_repository, profile_environment, server_arguments

    if args.profile not in PROFILES:
        parser.error(f"--profile must be one of {sorted(PROFILES)}, got {args.profile!r}")
    profile = PROFILES[args.profile]
    precision = "bf16" if profile.dtype == "bfloat16" else "fp32"

    checkpoint = resolve_checkpoint(args.checkpoint)
    print(f"checkpoint: {checkpoint}", flush=True)
    repository_dir = args.repository_dir or REPO_ROOT / "build" / "model_repository" / args.profile
    repository = build_repository(args.profile, checkpoint, repository_dir, adapters_dir=args.adapters_dir or None)
    print(f"model repository ({args.profile}): {repository}", flush=True)

    from gateway.app import create_app
    from gateway.request_ids import configure_logging
    from gateway.server import GatewayServer
    from gateway.settings import Settings

    configure_logging()
    triton = TritonServer(
        repository,
        http_port=args.triton_http_port,
        grpc_port=args.triton_grpc_port,
        metrics_port=args.triton_metrics_port,
        log_path=args.triton_log,
        log_verbose=args.triton_log_verbose,
        startup_timeout_s=args.startup_timeout,
        env=profile_environment(profile),
        extra_args=server_arguments(profile, torch.cuda.device_count() if profile.device == "cuda" else 0),
    )
    supervisor = Supervisor(triton)

    def gateway() -> int:
        settings = Settings.from_env(
            gateway_environment(checkpoint, triton, args.outputs, args.host, args.port, precision)
        )
        shown_host = "localhost" if args.host in ("0.0.0.0", "::") else args.host
        print(f"ACE-Step API: http://{shown_host}:{args.port} (POST /generate, docs at /docs)", flush=True)
        GatewayServer(create_app(settings), args.host, args.port).run()  # returns once drained
        return 0

    return run_in_foreground(triton, supervisor.start, gateway, supervisor.stop)


if __name__ == "__main__":
    sys.exit(main())
