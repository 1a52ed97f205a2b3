"""The serving settings reach the generated configs, and the stubs' environment imports this checkout.

Fast: configs are generated, not served (a gpu-profile repository can be written without a GPU).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2

from acestep_triton.specs import ADAPTER, ADAPTER_WEIGHT, CONDITION_KEY, CONDITION_RELEASE
from acestep_triton.tritonserver import REPO_ROOT, stub_environment
from export.build_repository import LOOP_CUDA_ALLOC_CONF, PROFILES, build_repository
from export.model_config import read_model_config

KIND_CPU = model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_CPU")
KIND_GPU = model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_GPU")
NEURAL = ("text_encoder", "condition_encoder", "dit_step", "dcae_decoder", "vocoder")


def configs(repo: Path) -> dict:
    return {p.name: read_model_config(p / "config.pbtxt") for p in repo.iterdir() if (p / "config.pbtxt").is_file()}


def params(config) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def test_gpu_profile_instances_devices_and_handoff(tmp_path, tiny_checkpoint, lyric_vocab) -> None:
    found = configs(build_repository("gpu", tiny_checkpoint, tmp_path / "repo", lyric_vocab))
    gpu = PROFILES["gpu"]
    preprocess = found["preprocess"].instance_group[0]
    assert (preprocess.kind, preprocess.count) == (KIND_CPU, gpu.preprocess_instances) and gpu.preprocess_instances > 1
    for name in NEURAL:
        group = found[name].instance_group[0]
        assert group.kind == KIND_GPU and group.count == getattr(gpu, f"{name}_instances")
        assert params(found[name])["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no"
    assert found["dcae_decoder"].instance_group[0].count == 1 and found["dit_step"].instance_group[0].count == 1
    dit = found["dit_step"]
    optional = {i.name for i in dit.input if i.optional}
    assert optional == {"ENCODER_STATES", "ENCODER_MASK", CONDITION_KEY, CONDITION_RELEASE, ADAPTER, ADAPTER_WEIGHT}
    assert int(params(dit)["MAX_ROW_FRAMES"]) == gpu.dit_max_row_frames
    assert dit.dynamic_batching.max_queue_delay_microseconds == gpu.dit_queue_delay_us
    loop = found["diffusion"]
    assert params(loop)["LOOP_DEVICE"] == "cpu" and params(loop)["CONDITION_CACHE"] == "1"
    assert loop.instance_group[0].kind == KIND_CPU and "FORCE_CPU_ONLY_INPUT_TENSORS" not in params(loop)


def test_overrides_move_the_loop_to_the_gpu_and_pick_gpus(tmp_path, tiny_checkpoint, lyric_vocab) -> None:
    repo = build_repository("gpu", tiny_checkpoint, tmp_path / "repo", lyric_vocab,
                            overrides={"loop_device": "cuda", "gpus": (0, 1), "vocoder_instances": 1})
    found = configs(repo)
    loop = found["diffusion"]
    assert loop.instance_group[0].kind == KIND_GPU and list(loop.instance_group[0].gpus) == [0, 1]
    assert params(loop)["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no"
    assert params(loop)["CUDA_ALLOC_CONF"] == LOOP_CUDA_ALLOC_CONF
    assert found["vocoder"].instance_group[0].count == 1 and list(found["vocoder"].instance_group[0].gpus) == [0, 1]
    with pytest.raises(ValueError, match="loop_device"):
        build_repository("gpu", tiny_checkpoint, tmp_path / "bad", lyric_vocab, overrides={"loop_device": "tpu"})
    with pytest.raises(TypeError):
        build_repository("gpu", tiny_checkpoint, tmp_path / "bad", lyric_vocab, overrides={"no_such_setting": 1})


def test_cpu_profile_keeps_direct_conditions_optional_and_no_gpu_parameters(tmp_path, tiny_checkpoint,
                                                                            lyric_vocab) -> None:
    found = configs(build_repository("cpu", tiny_checkpoint, tmp_path / "repo", lyric_vocab))
    for name in NEURAL:
        assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in params(found[name])
        assert ("MAX_ROW_FRAMES" in params(found[name])) == (name == "dit_step")


def test_stub_environment_imports_this_checkout_from_anywhere_and_leaves_the_source_alone(tmp_path) -> None:
    source_site = Path(sysconfig.get_paths()["purelib"])
    before = sorted(p.name for p in source_site.glob("*.pth"))
    bin_dir = stub_environment(Path(sys.executable), tmp_path / "stub-env")
    code = "import acestep_triton.contract as c, torch; print(c.__file__)"
    found = subprocess.run([str(bin_dir / "python3"), "-I", "-c", code], cwd="/", capture_output=True, text=True,
                           check=True).stdout.strip()
    assert Path(found).is_relative_to(REPO_ROOT)
    assert sorted(p.name for p in source_site.glob("*.pth")) == before
    assert stub_environment(Path(sys.executable), tmp_path / "stub-env") == bin_dir  # reused as it is
