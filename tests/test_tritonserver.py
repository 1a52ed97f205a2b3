"""The tritonserver launcher, config generation and perf_analyzer helper, on a real server.

The served model is a test fixture written here (Y = X + offset), not product code.
"""

from __future__ import annotations

import csv
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from acestep_triton.contract import TensorSpec
from acestep_triton.tritonserver import (
    TritonServer,
    TritonServerError,
    free_port,
    locate_server,
    prepare_backend_directory,
    process_group_pids,
)
from benchmarks.perf_analyzer import run_perf_analyzer
from export.model_config import (
    DynamicBatching,
    EnsembleStep,
    InstanceGroup,
    ModelSpec,
    read_model_config,
    to_model_config,
    write_model,
)

OFFSET = 1.5

ADD_OFFSET_MODEL = textwrap.dedent(
    '''
    import json

    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        """X [n] FP32 -> Y [n] FP32 = X + parameters.offset."""

        def initialize(self, args):
            config = json.loads(args["model_config"])
            self.offset = np.float32(config["parameters"]["offset"]["string_value"])

        def execute(self, requests):
            responses = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x + self.offset)]))
            return responses
    '''
)

BROKEN_MODEL = textwrap.dedent(
    '''
    class TritonPythonModel:
        def initialize(self, args):
            raise RuntimeError("broken on purpose")

        def execute(self, requests):
            return []
    '''
)

ADD_OFFSET = ModelSpec(
    name="add_offset",
    backend="python",
    max_batch_size=4,
    inputs=(TensorSpec("X", "TYPE_FP32", (-1,)),),
    outputs=(TensorSpec("Y", "TYPE_FP32", (-1,)),),
    dynamic_batching=DynamicBatching(preferred_batch_sizes=(2, 4), max_queue_delay_us=1000),
    ragged_inputs=frozenset({"X"}),
    instance_group=InstanceGroup("KIND_CPU", 1),
    parameters={"offset": str(OFFSET)},
)

ENSEMBLE = ModelSpec(
    name="add_twice",
    platform="ensemble",
    inputs=(TensorSpec("IN", "TYPE_FP32", (-1, -1)),),
    outputs=(TensorSpec("OUT", "TYPE_FP32", (-1, -1)),),
    ensemble_steps=(
        EnsembleStep("add_offset", {"X": "IN"}, {"Y": "mid"}),
        EnsembleStep("add_offset", {"X": "mid"}, {"Y": "OUT"}),
    ),
)


def _write_python_model(spec: ModelSpec, repo: Path, source: str) -> None:
    model_py = repo.parent / f"{spec.name}_model.py"
    model_py.write_text(source)
    write_model(spec, repo, model_py)


@pytest.fixture(scope="module")
def add_offset_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("add_offset") / "repo"
    _write_python_model(ADD_OFFSET, repo, ADD_OFFSET_MODEL)
    write_model(ENSEMBLE, repo)
    return repo


@pytest.fixture(scope="module")
def server(triton_server_factory, add_offset_repo: Path) -> TritonServer:
    return triton_server_factory(add_offset_repo)


def test_backend_directory_holds_stub_for_this_python(tmp_path: Path) -> None:
    install = locate_server()
    backend_dir = prepare_backend_directory(tmp_path / "backends")
    stub = backend_dir / "python" / "triton_python_backend_stub"
    assert stub.read_bytes() == install.stub.read_bytes()
    assert os.access(stub, os.X_OK)
    assert (backend_dir / "python" / "libtriton_python.so").is_file()
    assert prepare_backend_directory(tmp_path / "backends") == backend_dir


def test_extra_arguments_follow_ours_on_the_command_line(tmp_path: Path) -> None:
    pool = "--cuda-memory-pool-byte-size=0:268435456"
    server = TritonServer(tmp_path, extra_args=[pool])
    command = server.command(locate_server(), tmp_path / "backends")
    assert command[-1] == pool and "--strict-readiness=true" in command[:-1]


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_config_round_trips_through_pbtxt(tmp_path: Path) -> None:
    _write_python_model(ADD_OFFSET, tmp_path / "repo", ADD_OFFSET_MODEL)
    model_dir = write_model(ENSEMBLE, tmp_path / "repo")
    assert read_model_config(tmp_path / "repo" / "add_offset" / "config.pbtxt") == to_model_config(ADD_OFFSET)
    assert read_model_config(model_dir / "config.pbtxt") == to_model_config(ENSEMBLE)
    assert (tmp_path / "repo" / "add_offset" / "1" / "model.py").read_text() == ADD_OFFSET_MODEL
    assert (model_dir / "1").is_dir()
    config = to_model_config(ADD_OFFSET)
    assert config.input[0].allow_ragged_batch
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert config.parameters["offset"].string_value == str(OFFSET)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"ragged_inputs": frozenset({"NOPE"})}, "NOPE"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"platform": "ensemble"}, "exactly one of backend or platform"),
    ],
)
def test_invalid_spec_names_the_problem(change: dict, message: str) -> None:
    fields = {**ADD_OFFSET.__dict__, **change}
    with pytest.raises(ValueError, match=message):
        ModelSpec(**fields)


def test_unknown_dtype_is_named() -> None:
    spec = ModelSpec("m", (TensorSpec("X", "TYPE_FLOAT", (1,)),), (), backend="python")
    with pytest.raises(ValueError, match="X.*TYPE_FLOAT"):
        to_model_config(spec)


def test_server_ready_and_serves_generated_config(server: TritonServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert client.is_server_ready()
    assert client.is_model_ready("add_offset") and client.is_model_ready("add_twice")
    served = client.get_model_config("add_offset").config
    assert served.max_batch_size == ADD_OFFSET.max_batch_size
    assert served.input[0].allow_ragged_batch
    assert served.parameters["offset"].string_value == str(OFFSET)


def test_http_inference(server: TritonServer) -> None:
    x = np.arange(5, dtype=np.float32)[None]
    client = httpclient.InferenceServerClient(server.http_url)
    tensor = httpclient.InferInput("X", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("add_offset", [tensor])
    np.testing.assert_array_equal(result.as_numpy("Y"), x + OFFSET)


def test_grpc_inference_through_ensemble(server: TritonServer) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("IN", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("add_twice", [tensor])
    np.testing.assert_array_equal(result.as_numpy("OUT"), x + 2 * OFFSET)


def test_metrics_endpoint(server: TritonServer) -> None:
    import urllib.request

    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        assert b"nv_inference_request_success" in response.read()


def test_perf_analyzer_runs_against_server(server: TritonServer, tmp_path: Path) -> None:
    input_data = tmp_path / "input.json"
    input_data.write_text('{"data": [{"X": {"content": [1.0, 2.0, 3.0], "shape": [3]}}]}')
    csv_path = tmp_path / "perf.csv"
    run_perf_analyzer(
        "add_offset", server.grpc_url, input_data, (1, 2, 1), csv_path=csv_path,
        extra_args=["--measurement-interval", "300", "--stability-percentage", "100"], timeout_s=120,
    )
    rows = list(csv.DictReader(csv_path.open()))
    assert [row["Concurrency"] for row in rows] == ["1", "2"]
    assert all(float(row["Inferences/Second"]) > 0 for row in rows)


@pytest.mark.slow
def test_model_failing_initialize_names_it(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _write_python_model(ADD_OFFSET, repo, ADD_OFFSET_MODEL)
    broken = ModelSpec("broken_model", ADD_OFFSET.inputs, ADD_OFFSET.outputs, backend="python")
    _write_python_model(broken, repo, BROKEN_MODEL)
    server = TritonServer(repo, log_path=tmp_path / "server.log", startup_timeout_s=60)
    with pytest.raises(TritonServerError, match="broken_model") as failure:
        server.start()
    assert "broken on purpose" in str(failure.value)
    assert server.process is None


@pytest.mark.slow
def test_stop_leaves_no_process(add_offset_repo: Path, tmp_path: Path) -> None:
    with TritonServer(add_offset_repo, log_path=tmp_path / "server.log") as server:
        assert server.process is not None
        pid = server.process.pid
        assert len(process_group_pids(pid)) >= 2, "expected the server and its python stubs"
    assert process_group_pids(pid) == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not server.is_ready()


def test_serve_points_gateway_settings_at_triton(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from acestep_triton.serve import gateway_environment
    from gateway.settings import Settings

    monkeypatch.delenv("ACESTEP_PRECISION", raising=False)
    triton = TritonServer(tmp_path, grpc_port=18911, log_path=tmp_path / "server.log")
    env = gateway_environment(tmp_path / "ckpt", triton, tmp_path / "out", "127.0.0.1", 18900, "bf16")
    settings = Settings.from_env(env)
    assert settings.triton_url == "127.0.0.1:18911" and settings.triton_protocol == "grpc"
    assert settings.checkpoint_path == str(tmp_path / "ckpt")
    assert settings.outputs_dir == tmp_path / "out" and settings.port == 18900 and settings.bf16
