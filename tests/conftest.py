"""Session fixtures shared by every test module, and the rule that keeps the fast tier fast.

Two speeds (README, "Tests"): `make test` runs everything; `pytest -m "not slow" tests` is the
edit-test loop, under a minute. A test is slow when it uses a fixture below that starts a
tritonserver or exports ONNX graphs (marked here, automatically), or when its module or itself
says `slow` (whole generations, servers started in the test body).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# fixtures that start a tritonserver or export graphs
SLOW_FIXTURES = frozenset({"triton_server_factory", "acestep_triton_server", "onnx_exports"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _golden_dir() -> Path:
    return Path(os.environ.get("ACESTEP_GOLDEN", REPO_ROOT.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    path = _golden_dir()
    if not (path / "MANIFEST.json").is_file():
        pytest.fail(f"golden data not found at {path} (set ACESTEP_GOLDEN)")
    return path


@pytest.fixture(scope="session")
def golden_ckpt(golden_dir: Path) -> Path:
    return golden_dir / "tiny-ckpt"


@pytest.fixture(scope="session")
def lyric_vocab(golden_dir: Path) -> Path:
    return golden_dir / "lyric_vocab.json"


@pytest.fixture(scope="session")
def triton_server_factory(tmp_path_factory: pytest.TempPathFactory):
    """Start (once per repository and options) a real tritonserver on free loopback ports.

    `start(model_repository, shared=False, **options)` returns a started
    `acestep_triton.tritonserver.TritonServer` (attributes http_url, grpc_url,
    metrics_url, log_path; options as its constructor's). A `shared` server (the session's
    `acestep_triton_server`) runs until the session ends; of the others, one module's own, only the
    latest runs: starting another stops it (each server's stubs hold ~3 GB, and a worker runs a
    module's tests together).
    """
    from acestep_triton.tritonserver import TritonServer

    servers: dict[str, TritonServer] = {}
    shared_keys: set[str] = set()

    def start(model_repository: Path, shared: bool = False, **options) -> TritonServer:
        key = repr((str(Path(model_repository).resolve()), sorted(options.items())))
        if key not in servers:
            for other in [k for k in servers if k not in shared_keys]:
                servers.pop(other).stop()
            log_path = tmp_path_factory.mktemp("tritonserver") / "server.log"
            options.setdefault("startup_timeout_s", 900)
            server = TritonServer(model_repository, log_path=log_path, **options)
            server.start()
            servers[key] = server
        if shared:
            shared_keys.add(key)
        server = servers[key]
        if server.process is None or server.process.poll() is not None:
            pytest.fail(f"tritonserver for {model_repository} is no longer running:\n{server.log_tail()}")
        return server

    yield start
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="session")
def tiny_checkpoint(golden_ckpt: Path) -> Path:
    """The checkpoint the session's Triton server serves: the official tiny one, unchanged."""
    return golden_ckpt


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, lyric_vocab: Path) -> Path:
    """The cpu-profile repository, generated the way `make serve` generates it."""
    from export.build_repository import build_repository

    return build_repository("cpu", tiny_checkpoint, tmp_path_factory.mktemp("model_repository"), lyric_vocab)


@pytest.fixture(scope="session")
def acestep_triton_server(triton_server_factory, model_repository: Path):
    """One real tritonserver per session serving the whole `acestep` ensemble on the tiny checkpoint."""
    return triton_server_factory(model_repository, shared=True)


@pytest.fixture(scope="session")
def onnx_exports(tmp_path_factory: pytest.TempPathFactory, golden_ckpt: Path) -> Path:
    """The five components of the golden tiny checkpoint exported once (export.onnx_export), each
    already checked against PyTorch by the export itself; `<dir>/<component>.onnx`."""
    from export.onnx_export import COMPONENTS, export_component

    out = tmp_path_factory.mktemp("onnx")
    for name in COMPONENTS:
        export_component(name, golden_ckpt, out)
    return out
