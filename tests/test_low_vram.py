"""The lowvram profile (acestep_triton.low_vram) computes what the plain engines compute, on the CPU.

What it changes is where weights and working memory live: the decoders' weights move to the device
for an execution only (`HostWeights`, exercised here with the CPU as the "device": every onload is a
fresh copy), the DCAE's global part runs chunk by chunk, the decoders window one at a time, GPU
components take turns (a file lock), and the generated configs say so. The memory itself is
measured on the GPU by benchmarks/bench_lowvram.py.
"""

from __future__ import annotations

import fcntl
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2

from acestep_triton.checkpoint import Checkpoint
from acestep_triton.components import load_component, load_components
from acestep_triton.engines import load_engines
from acestep_triton.ensemble_client import infer_inputs
from acestep_triton.low_vram import HostWeights, LowVram, exclusive, gpu_lock_path, prepare_engine
from acestep_triton.models import dcae as dcae_module
from acestep_triton.models.attention import UNAPPLIED_PROJECTIONS
from acestep_triton.models.transformer import ACEStepTransformer
from export.build_repository import PROFILES, build_repository, profile_environment, resolve_profile, server_arguments
from export.model_config import read_model_config
from export.samples import Sizes, sample_inputs
from tests.golden_cases import ext_request, golden_params, golden_tensors
from tests.test_lora import golden_waveform, lora_case
from tests.stream_client import stream_responses
from tests.test_triton_repository import infer

KIND_CPU = model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_CPU")
LOW_VRAM_FLAGS = ("LOW_VRAM", "OFFLOAD_WEIGHTS", "RELEASE_CACHE", "GPU_LOCK")


@pytest.fixture(scope="module")
def dcae(golden_ckpt: Path):
    return dcae_module.load_dcae(golden_ckpt / "music_dcae_f8c8")


@torch.no_grad()
def test_chunked_global_part_equals_the_whole_one(dcae) -> None:
    """The EfficientViT blocks chunk by chunk give the whole blocks' output (float32 sums reordered:
    ~1e-6 of the output's scale of ~40), for a non-divisor of the length and one frame short of
    the whole; running each chunk's attention on its own does not, so the two passes are what make
    it equal."""
    latents = torch.randn(2, 8, 16, 45, generator=torch.Generator().manual_seed(3))
    whole = dcae_module.decode_global_part(dcae, latents)
    for chunk in (7, 44):
        chunked = dcae_module.decode_global_part(dcae, latents, chunk)
        torch.testing.assert_close(chunked, whole, rtol=0.0, atol=1e-4)
    hidden = dcae.decoder.conv_in(latents / dcae_module.LATENT_SCALE + dcae_module.LATENT_SHIFT)
    block = dcae.decoder.up_blocks[-1][0]
    local_only = torch.cat([block(hidden[..., start : start + 15]) for start in range(0, 45, 15)], dim=-1)
    assert (local_only - block(hidden)).abs().max() > 1e-2


@torch.no_grad()
def test_windowed_decode_with_chunked_global_part_equals_whole_decode(dcae) -> None:
    latents = torch.randn(1, 8, 16, 40, generator=torch.Generator().manual_seed(5))
    whole = dcae_module.latents_to_mel(dcae, latents)
    windowed = dcae_module.latents_to_mel_windowed(dcae, latents, 24, window_batch=1, global_chunk_frames=9)
    torch.testing.assert_close(windowed, whole, rtol=0.0, atol=5e-5)


def test_host_weights_move_for_an_execution_and_back() -> None:
    """Outside: every parameter and buffer is its host copy; inside: a fresh copy on the device (the
    CPU here); the result equals the module's own; a tensor shared by two submodules moves once."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 6)).eval()
    module[2].weight = module[0].weight
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = module(x)
    weights = HostWeights(module, "cpu")
    assert len(weights.tensors) == len({id(t) for t in (*module.parameters(), *module.buffers())}) == 8
    host_pointers = [t.data_ptr() for t in weights.host]

    def pointers() -> list[int]:
        return [t.data_ptr() for t in weights.tensors]

    assert pointers() == host_pointers
    with weights, torch.no_grad():
        inside = pointers()
        actual = module(x)
    assert not set(inside) & set(host_pointers)
    assert module[2].weight is module[0].weight
    assert pointers() == host_pointers
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("name", ["dcae_decoder", "vocoder"])
def test_offloaded_components_hold_no_tensor_outside_parameters_and_buffers(golden_ckpt: Path, name: str) -> None:
    """HostWeights moves parameters and buffers: a tensor kept as a plain attribute would stay behind
    on the host and meet device inputs."""
    module = load_component(name, Checkpoint(golden_ckpt))
    if name == "dcae_decoder":
        assert module.dcae.encoder is None  # its registry parts: the decoder alone moves
    stray = [f"{path}.{key}" for path, sub in module.named_modules() for key, value in vars(sub).items()
             if isinstance(value, torch.Tensor)]
    assert stray == []


@pytest.mark.slow  # whole decodes of three components, twice
@torch.no_grad()
def test_low_vram_hooks_equal_plain_engines(golden_ckpt: Path) -> None:
    """dit_step, dcae_decoder and vocoder prepared by their lowvram hooks (with windows and chunks
    small enough for the tiny inputs to span several) against plain engines, the decoders' weights
    offloaded between executions."""
    ckpt = Checkpoint(golden_ckpt)
    names = ["dit_step", "dcae_decoder", "vocoder"]
    plain, low = load_engines(names, ckpt), load_engines(names, ckpt)
    settings = LowVram(dcae_window_frames=40, dcae_chunk_frames=9, vocoder_window_frames=200, warm_seconds=2.0)
    for name in names:
        prepare_engine(name, low[name], settings)
    assert low["dcae_decoder"].module.global_chunk_frames == 9 and low["vocoder"].module.window_batch == 1
    # (batch, latent frames): 2-3 DCAE windows and 6 chunks, two vocoder windows (240 mel frames)
    sizes = {"dit_step": (2, 40), "dcae_decoder": (2, 50), "vocoder": (1, 30)}
    for name in names:
        batch, frames = sizes[name]
        inputs = sample_inputs(name, ckpt, Sizes(batch, text_tokens=5, lyric_tokens=9, latent_frames=frames), seed=7)
        expected = plain[name].run(inputs)
        with HostWeights(low[name].module, "cpu") if name != "dit_step" else nullcontext():
            actual = low[name].run(inputs)
        for key, value in expected.items():
            bound = 2e-5 * float(value.abs().max())  # float32 rounding of reordered sums, at the output's scale
            torch.testing.assert_close(actual[key], value, rtol=0.0, atol=bound, msg=f"{name}.{key}")


@torch.no_grad()
def test_loaded_transformer_drops_only_projections_no_forward_applies(golden_ckpt: Path) -> None:
    ckpt = Checkpoint(golden_ckpt)
    modules = load_components(["condition_encoder", "dit_step"], ckpt)
    loaded = modules["dit_step"].transformer
    for block in loaded.transformer_blocks:
        assert not any(hasattr(block.cross_attn, name) for name in UNAPPLIED_PROJECTIONS)
    full = ACEStepTransformer.from_pretrained(golden_ckpt / "ace_step_transformer").eval()
    dropped = sum(p.numel() for b in full.transformer_blocks for n in UNAPPLIED_PROJECTIONS
                  for p in getattr(b.cross_attn, n).parameters())
    assert dropped > 0
    inputs = sample_inputs("dit_step", ckpt, Sizes(batch=2, text_tokens=5, lyric_tokens=9, latent_frames=12), seed=1)
    args = [inputs[k] for k in inputs]
    torch.testing.assert_close(modules["dit_step"](*args)[0],
                               full.decode(*args[:4], args[4][:, 0], args[5][:, 0]), rtol=0.0, atol=0.0)


def test_gpu_lock_is_held_inside_and_free_after(tmp_path: Path) -> None:
    path = gpu_lock_path(tmp_path / "repo")
    assert path == gpu_lock_path(tmp_path / "repo") != gpu_lock_path(tmp_path / "other")

    def try_lock() -> bool:
        with open(path, "a+b") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(handle, fcntl.LOCK_UN)
            return True

    with exclusive(path):
        assert not try_lock()
    assert try_lock()


def _configs(repo: Path) -> dict:
    return {p.name: read_model_config(p / "config.pbtxt") for p in repo.iterdir() if (p / "config.pbtxt").is_file()}


def _params(config) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def test_lowvram_profile_places_every_component(tmp_path: Path, golden_ckpt: Path, lyric_vocab: Path) -> None:
    """Encoders (dcae_encoder too) on the CPU in float32 with none of the memory settings; dit_step
    resident in bf16; the decoders offloaded, one item per forward; every instance KIND_CPU (no GPU
    tensors between processes), the loop on the CPU; the server without memory pools."""
    profile = PROFILES["lowvram"]
    found = _configs(build_repository("lowvram", golden_ckpt, tmp_path / "repo", lyric_vocab))
    assert {g.kind for c in found.values() for g in c.instance_group} == {KIND_CPU}
    for name in ("text_encoder", "condition_encoder", "dcae_encoder"):
        params = _params(found[name])
        assert (params["DEVICE"], params["DTYPE"]) == ("cpu", "float32")
        assert not set(LOW_VRAM_FLAGS) & set(params)
    dit = _params(found["dit_step"])
    assert (dit["DEVICE"], dit["DTYPE"]) == ("cuda", "bfloat16") and "OFFLOAD_WEIGHTS" not in dit
    assert {dit[k] for k in ("LOW_VRAM", "RELEASE_CACHE", "GPU_LOCK")} == {"1"}
    assert int(dit["MAX_ROW_FRAMES"]) == profile.dit_max_row_frames == 2583  # one 240 s row
    assert dit["MAX_ADAPTERS"] == "1"  # one LoRA adapter's factors on the GPU at a time
    for name in ("dcae_decoder", "vocoder"):
        params = _params(found[name])
        assert all(params[k] == "1" for k in LOW_VRAM_FLAGS) and params["MAX_ROW_FRAMES"] == "1"
    assert _params(found["diffusion"])["LOOP_DEVICE"] == "cpu"
    assert server_arguments(profile, 2) == ["--cuda-memory-pool-byte-size=0:0", "--cuda-memory-pool-byte-size=1:0",
                                            "--pinned-memory-pool-byte-size=0"]
    assert server_arguments(PROFILES["gpu"], 2) == []
    assert profile_environment(profile)["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert profile_environment(PROFILES["cpu"]) == {}


def test_lowvram_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown components \\['vocodr'\\]"):
        resolve_profile("lowvram", {"cpu_components": ("vocodr",)})
    with pytest.raises(ValueError, match="low_vram"):
        resolve_profile("lowvram", {"accelerate": True})
    moved = resolve_profile("lowvram", {"resident_weights": ("dit_step", "vocoder")})
    assert moved.offloads("dcae_decoder") and not moved.offloads("vocoder")
    assert not resolve_profile("lowvram", {"resident_weights": None}).offloads("dcae_decoder")


@pytest.fixture(scope="module")
def lowvram_server(tmp_path_factory, triton_server_factory, golden_ckpt, lyric_vocab, golden_dir):
    """The lowvram profile through a real tritonserver, with the CPU as its device (hooks, weights moved
    per execution, host outputs, the lock, one item per decoder forward); the golden data's folder as
    its adapters directory."""
    repo = build_repository("lowvram", golden_ckpt, tmp_path_factory.mktemp("lowvram_repo"), lyric_vocab,
                            overrides={"device": "cpu", "dtype": "float32", "diffusion_instances": 1},
                            adapters_dir=golden_dir)
    return triton_server_factory(repo)


def test_lowvram_profile_served_on_the_cpu_matches_golden(lowvram_server, golden_dir) -> None:
    case = "a_euler_apg_erg"
    params = golden_params(golden_dir, case)
    out = infer(lowvram_server, params)
    reference = golden_tensors(golden_dir, case)["final_waveform"].numpy()
    err = np.abs(out.waveforms[0] - reference).max()
    assert err < 1e-4, f"lowvram profile: waveform max abs error {err:.2e}"


@pytest.mark.parametrize("case", ["ed1_edit_navg1", "p1_repaint"])
def test_lowvram_profile_serves_the_tasks_that_start_from_audio(lowvram_server, golden_dir, case) -> None:
    """The loop's call to dcae_encoder (on the CPU in this profile), an edit's four branches of prepared
    keys/values in dit_step's condition cache, and (repaint) the stream model: the official waveforms."""
    params, source = ext_request(golden_dir, case)
    if case == "p1_repaint":
        *_, result = stream_responses(lowvram_server.grpc_url, infer_inputs(grpcclient, params, source=source),
                                      timeout_s=600)
        assert not isinstance(result, Exception), result
        waveform = result.as_numpy("WAVEFORM")[0]
    else:
        waveform = infer(lowvram_server, params, source=source).waveforms[0]
    wav, _ = soundfile.read(golden_dir / "ext" / f"{case}.wav", dtype="float32", always_2d=True)
    err = float(np.abs(waveform - wav.T).max())
    assert err < 1e-4, f"lowvram profile, {case}: waveform max abs error {err:.2e}"


def test_lowvram_profile_serves_a_lora_adapter(lowvram_server, golden_dir) -> None:
    """The golden adapter at 0.7 (on the CPU's condition_encoder and as dit_step's one loaded adapter):
    upstream's waveform."""
    waveform = infer(lowvram_server, lora_case(golden_dir, "l1_lora_w07")).waveforms[0]
    err = float(np.abs(waveform - golden_waveform(golden_dir, "l1_lora_w07")).max())
    assert err < 1e-4, f"lowvram profile, LoRA: waveform max abs error {err:.2e}"
