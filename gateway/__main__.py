"""`python -m gateway [--host H] [--port P]`: serve the gateway (gateway.server.GatewayServer).

Every other setting comes from ACESTEP_* environment variables (gateway/settings.py).
"""

from __future__ import annotations

import argparse
import dataclasses

from gateway.app import create_app
from gateway.request_ids import configure_logging
from gateway.server import GatewayServer
from gateway.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway", description="Serve the ACE-Step REST gateway.")
    parser.add_argument("--host", help="bind address (default: ACESTEP_HOST or 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port (default: ACESTEP_PORT or 8000)")
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default: info)")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    settings = dataclasses.replace(settings, host=args.host or settings.host, port=args.port or settings.port)
    configure_logging()
    GatewayServer(create_app(settings), settings.host, settings.port, args.log_level).run()


if __name__ == "__main__":
    main()
