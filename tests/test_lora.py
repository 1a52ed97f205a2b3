"""LoRA adapters: names and the adapters directory, the per-row math, isolation inside one batch, the
resident set, parity with upstream on the golden cases l1/l2/l3, and the same through a real tritonserver.

The adapters directory of these tests is the golden data's folder, so `tiny-lora` names the golden
tiny adapter (../shared/golden/tiny-lora, built for tiny-ckpt).
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from acestep_triton.adapters import ADAPTER_FILE, AdapterChoice, AdapterResolver, AdapterSettings, resolver_from_parameters
from acestep_triton.condition_cache import ConditionSender
from acestep_triton.contract import NO_LORA, GenerationParams, ParameterError
from acestep_triton.engines import load_engines
from acestep_triton.lora import AdapterStore
from acestep_triton.specs import ADAPTER, ADAPTER_WEIGHT, ERG_Q_SCALE
from tests.golden_cases import ext_request

TINY = "tiny-lora"
FIELD = "lora_name_or_path"


@pytest.fixture(scope="module")
def settings(golden_dir: Path) -> AdapterSettings:
    return AdapterSettings(golden_dir, hub=False)


# --- names and the adapters directory -------------------------------------------------------------

@pytest.mark.parametrize(("name", "message"), [
    ("no-such-adapter", "unknown adapter"),
    ("tiny-ckpt", "unknown adapter"),  # a folder of the directory, but no adapter file in it
    ("../golden/tiny-lora", "'..'"),
    ("tiny-lora/../tiny-lora", "'..'"),
    ("/work/shared/golden/tiny-lora", "not a path"),
    ("C:\\adapters\\x", "not a path"),
    (".hidden", "not an adapter name"),
    ("a//b", "not an adapter name"),
    ("", "not an adapter name"),
])
def test_names_outside_the_directory_or_unknown_are_refused_naming_the_field(settings, name, message) -> None:
    with pytest.raises(ParameterError, match=message) as info:
        AdapterResolver(settings).check(name)
    assert info.value.field == FIELD


def test_a_folder_of_the_directory_and_none_are_served(settings, golden_dir) -> None:
    resolver = AdapterResolver(settings)
    assert resolver.check(TINY) == TINY and resolver.check(NO_LORA) == NO_LORA
    assert resolver.folder(TINY) == (golden_dir / TINY).resolve()


def test_a_symlink_out_of_the_directory_is_refused(tmp_path, golden_dir) -> None:
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "escape").symlink_to(golden_dir / TINY)
    with pytest.raises(ParameterError, match="outside the adapters directory"):
        AdapterResolver(AdapterSettings(tmp_path / "adapters")).check("escape")


def test_deployments_without_adapters_refuse_them_and_say_why() -> None:
    with pytest.raises(ParameterError, match="no adapters directory"):
        AdapterResolver(None).check(TINY)
    for engine in ("onnx", "tensorrt"):
        with pytest.raises(ParameterError, match=f"{engine} engine") as info:
            resolver_from_parameters({"ENGINE": engine}).check(TINY)
        assert info.value.field == FIELD
    assert resolver_from_parameters({"ENGINE": "onnx"}).check(NO_LORA) == NO_LORA


def test_hub_ids_offline_get_a_clear_error(monkeypatch, settings) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub = AdapterSettings(settings.directory, hub=True)
    with pytest.raises(ParameterError, match="offline") as info:
        AdapterResolver(hub).check("someone/some-ace-step-lora")
    assert info.value.field == FIELD
    with pytest.raises(ParameterError, match="unknown adapter"):  # a deployment that does not fetch
        AdapterResolver(settings).check("someone/some-ace-step-lora")


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan")])
def test_lora_weight_outside_its_range_names_the_field(weight) -> None:
    with pytest.raises(ParameterError) as info:
        GenerationParams(prompt="pop", lyrics="", lora_name_or_path=TINY, lora_weight=weight)
    assert info.value.field == "lora_weight"


def test_the_condition_cache_key_carries_the_adapter_and_its_weight() -> None:
    """Prepared keys/values go through the adapted to_k/to_v: a key names the adapter and weight they
    were prepared with (the base model's, whatever its weight, is one)."""
    choices = (AdapterChoice(), AdapterChoice(NO_LORA, 0.5), AdapterChoice(TINY, 0.7), AdapterChoice(TINY, 0.3),
               AdapterChoice("other", 0.7))
    keys = [ConditionSender("req", choice).key("cond") for choice in choices]
    assert keys[0] == keys[1] and len(set(keys)) == 4
    assert f"|{TINY}@0.7|" in keys[2]


@pytest.mark.parametrize(("adapter", "sent"), [(AdapterChoice(TINY, 0.7), TINY), (AdapterChoice(), NO_LORA),
                                             (None, None)])
def test_the_loop_sends_every_dit_step_row_its_requests_adapter(adapter, sent) -> None:
    """Base-model rows carry ADAPTER too (Triton batches only requests with the same inputs); a dit_step
    without adapter inputs (None) gets none."""
    from acestep_triton.bls_loop import StepLoop
    from acestep_triton.sampling.conditions import Conditions

    calls = []

    def call(batch):
        calls.append(batch)
        return torch.zeros_like(batch["LATENTS"])

    conditions = Conditions(("cond", "null"), torch.zeros(2, 3, 32), torch.ones(2, 3))
    loop = StepLoop(call, conditions, True, None, [("cond", "null"), ("cond",)], adapter)
    loop.step(torch.zeros(4, 8, 16, 5), torch.full((4,), 900.0), ("cond", "null"))
    loop.step(torch.zeros(2, 8, 16, 5), torch.full((2,), 800.0), ("cond",))
    for batch, rows in zip(calls, (4, 2)):
        if sent is None:
            assert ADAPTER not in batch and ADAPTER_WEIGHT not in batch
            continue
        assert batch[ADAPTER].reshape(-1).tolist() == [sent.encode()] * rows
        assert batch[ADAPTER_WEIGHT].reshape(-1).tolist() == pytest.approx([adapter.weight] * rows)


def test_configs_take_adapters_where_the_engine_serves_them_and_refuse_them_elsewhere(tmp_path, golden_ckpt,
                                                                                     golden_dir) -> None:
    from acestep_triton.checkpoint import validate_checkpoint
    from acestep_triton.registry import component_spec
    from export.build_repository import adapter_parameters, component_model, preprocess_model, resolve_profile

    ckpt = validate_checkpoint(golden_ckpt)
    for profile_name in ("cpu", "gpu", "onnx", "tensorrt"):
        profile = resolve_profile(profile_name)
        adapters = adapter_parameters(profile, str(golden_dir))
        preprocess = preprocess_model(ckpt, str(golden_ckpt), None, profile, adapters)
        resolver = resolver_from_parameters(preprocess.parameters)
        for name in ("condition_encoder", "dit_step", "vocoder"):
            model = component_model(component_spec(name, ckpt), str(golden_ckpt), profile, tmp_path, adapters)
            takes = {ADAPTER, ADAPTER_WEIGHT} <= model.optional_inputs
            assert takes == (profile.engine == "pytorch" and name != "vocoder"), (profile_name, name)
        if profile.engine == "pytorch":
            assert resolver.check(TINY) == TINY
        else:
            with pytest.raises(ParameterError, match=profile.engine):
                resolver.check(TINY)


# --- the math, per row ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engines(golden_ckpt, settings):
    from acestep_triton.checkpoint import validate_checkpoint

    torch.manual_seed(0)
    return load_engines(["condition_encoder", "dit_step"], validate_checkpoint(golden_ckpt), adapters=settings)


def _rows(store: AdapterStore, names: list[str], weights: list[float]) -> dict[str, torch.Tensor]:
    return store.request_rows(names, torch.tensor(weights))


def test_an_adapted_layer_computes_base_plus_weight_times_b_a_x(engines, golden_dir) -> None:
    """W x + b + w * B(A(x)) per row, from the adapter file itself; rows without the adapter get W x + b."""
    store = engines["condition_encoder"].adapters
    layer = engines["condition_encoder"].module.transformer.lyric_encoder.encoders[2].feed_forward.w_1
    factors = load_file(str(golden_dir / TINY / ADAPTER_FILE))
    down = factors["lyric_encoder.encoders.2.feed_forward.w_1.lora_A.weight"]
    up = factors["lyric_encoder.encoders.2.feed_forward.w_1.lora_B.weight"]
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(1))
    rows = _rows(store, [TINY, NO_LORA, TINY], [0.7, 1.0, 0.3])
    with torch.no_grad(), store.applied(rows["ADAPTER_ID"], rows[ADAPTER_WEIGHT]):
        adapted = layer(x)
    base = x @ layer.weight.T + layer.bias
    lora = x @ down.T @ up.T
    expected = torch.stack([base[0] + 0.7 * lora[0], base[1], base[2] + 0.3 * lora[2]]).detach()
    torch.testing.assert_close(adapted, expected, rtol=0, atol=1e-5)
    assert torch.equal(adapted[1], layer(x)[1].detach())


def _encoder_batch(rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"TEXT_STATES": torch.randn(1, 7, 32, generator=g).expand(rows, -1, -1),
            "TEXT_MASK": torch.ones(rows, 7, dtype=torch.int64), "TEXT_SCALE": torch.ones(rows, 1),
            "LYRIC_IDS": torch.randint(1, 6000, (1, 11), generator=g).expand(rows, -1),
            "LYRIC_MASK": torch.ones(rows, 11, dtype=torch.int64), "LYRIC_Q_SCALE": torch.ones(rows, 1)}


def _dit_batch(rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"LATENTS": torch.randn(1, 8, 16, 9, generator=g).expand(rows, -1, -1, -1),
            "ATTENTION_MASK": torch.ones(rows, 9), "ENCODER_STATES": torch.randn(1, 13, 32, generator=g).expand(rows, -1, -1),
            "ENCODER_MASK": torch.ones(rows, 13), "TIMESTEP": torch.full((rows, 1), 700.0),
            "Q_SCALE": torch.tensor([[1.0], [ERG_Q_SCALE], [1.0], [1.0]])}


@pytest.mark.parametrize(("name", "batch", "output"), [("condition_encoder", _encoder_batch, "ENCODER_STATES"),
                                                       ("dit_step", _dit_batch, "VELOCITY")])
def test_rows_of_one_batch_keep_their_own_adapter(engines, name, batch, output) -> None:
    """Rows [adapter at 0.7, base, adapter at 0.3, base] of one batch: base rows are bit-identical to an
    all-base batch, adapter rows equal an all-adapter batch at their weight, and differ from the base."""
    engine = engines[name]
    store = engine.adapters
    inputs = batch(4)
    mixed = engine.run({**inputs, **_rows(store, [TINY, NO_LORA, TINY, NO_LORA], [0.7, 1.0, 0.3, 1.0])})[output]
    base = engine.run(inputs)[output]
    adapted = engine.run({**inputs, **_rows(store, [TINY] * 4, [0.7, 0.7, 0.3, 0.3])})[output]
    assert torch.equal(mixed[[1, 3]], base[[1, 3]])
    torch.testing.assert_close(mixed[[0, 2]], adapted[[0, 2]], rtol=0, atol=1e-5 * max(1.0, adapted.abs().max().item()))
    assert (mixed[0] - base[0]).abs().max() > 1e-3 and (mixed[0] - mixed[2]).abs().max() > 1e-3
    assert torch.equal(engine.run({**inputs, **_rows(store, [TINY] * 4, [0.0] * 4)})[output], base)


def test_the_gpu_decode_runs_adapter_rows_apart_and_the_others_as_without_them(golden_ckpt, settings) -> None:
    """acceleration.BucketedDecode (its bucket padding on CPU, graphs off): a batch of rows with and without
    the adapter equals the plain decode of that batch, and its base rows decode exactly as a batch of
    their own."""
    from acestep_triton.acceleration import Acceleration, BucketedDecode
    from acestep_triton.models.transformer import ACEStepTransformer

    transformer = ACEStepTransformer.from_pretrained(golden_ckpt / "ace_step_transformer").eval().requires_grad_(False)
    store = AdapterStore(transformer, settings, torch.device("cpu"), torch.float32)
    decode = BucketedDecode(transformer, Acceleration(decode_graphs=False, frame_bucket=16, token_bucket=32,
                                                      row_buckets=(1, 2, 4)), store)
    batch = _dit_batch(4)
    inputs = (batch["LATENTS"], batch["ATTENTION_MASK"], batch["ENCODER_STATES"], batch["ENCODER_MASK"],
              batch["TIMESTEP"][:, 0], batch["Q_SCALE"][:, 0])
    rows = _rows(store, [TINY, NO_LORA, TINY, NO_LORA], [0.7, 1.0, 0.3, 1.0])
    with torch.inference_mode():
        with store.applied(rows["ADAPTER_ID"], rows[ADAPTER_WEIGHT]):
            mixed = decode(*inputs)
            expected = transformer.decode(*inputs)
        alone = decode(*(t[[1, 3]] for t in inputs))
    torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-5 * max(1.0, expected.abs().max().item()))
    assert torch.equal(mixed[[1, 3]], alone)
    assert (mixed[0] - mixed[1]).abs().max() > 1e-3


def _bucketed(engine) -> None:
    """The gpu profile's decode on the engine's module (acceleration.BucketedDecode: prepared keys/values,
    row buffer, bucket padding) on the CPU, graphs off."""
    from acestep_triton.acceleration import Acceleration, BucketedDecode

    decode = BucketedDecode(engine.module.transformer, Acceleration(decode_graphs=False, frame_bucket=16,
                                                                    token_bucket=32, row_buckets=(1, 2, 4)),
                            engine.adapters)
    engine.module.decode, engine.module.prepare, engine.module.decode_rows = decode, decode.prepare, decode.decode_rows


@pytest.mark.parametrize("decode", ["eager", "bucketed"])
def test_dit_step_prepares_and_decodes_each_requests_rows_with_its_own_adapter(engines, golden_ckpt, settings,
                                                                             decode) -> None:
    """Two loop requests, the adapter at 0.7 and the base model, in one dit_step execution: their
    conditions are prepared once per key under each one's adapter (the prepared cross-attention keys/values
    differ), inline and then by key, and each request's velocity equals the spec's decode of its rows with
    its adapter (engine.run), whatever the other request's adapter."""
    from acestep_triton.checkpoint import validate_checkpoint
    from acestep_triton.condition_cache import ConditionCache, new_request_id
    from acestep_triton.dit_step import DitStep

    engine = engines["dit_step"]
    if decode == "bucketed":
        engine = load_engines(["dit_step"], validate_checkpoint(golden_ckpt), adapters=settings)["dit_step"]
        _bucketed(engine)
    step = DitStep(engine, ConditionCache(2**30, 60.0))
    batch = _dit_batch(4)
    batch["ENCODER_STATES"] = batch["ENCODER_STATES"] + torch.arange(4.0)[:, None, None]  # one set per row
    choices = {"adapter": (slice(0, 2), AdapterChoice(TINY, 0.7)), "base": (slice(2, 4), AdapterChoice())}
    requests, expected = {}, {}
    for name, (rows, choice) in choices.items():
        inputs = {k: v[rows] for k, v in batch.items()}
        sender = ConditionSender(new_request_id(), choice)
        requests[name] = {**inputs, **choice.arrays(2), "CONDITION_KEY": sender.row_keys(("cond", "null"), 1)}
        adapter_rows = engine.adapters.wire_rows(*choice.arrays(2).values(), 2)
        expected[name] = engines["dit_step"].run({**inputs, **adapter_rows})["VELOCITY"]
    inline = step.execute(list(requests.values()))
    by_key = step.execute([{k: v for k, v in r.items() if not k.startswith("ENCODER_")} for r in requests.values()])
    for name, first, later in zip(requests, inline, by_key):
        scale = max(1.0, expected[name].abs().max().item())
        torch.testing.assert_close(first["VELOCITY"], expected[name], rtol=0, atol=1e-5 * scale)
        assert torch.equal(later["VELOCITY"], first["VELOCITY"]), name
    keys = [key.decode() for r in requests.values() for key in r["CONDITION_KEY"].reshape(-1)]
    adapted, base = step.cache.find(keys[0]), step.cache.find(keys[2])
    plain = engine.module.prepare(batch["ENCODER_STATES"][:1], batch["ENCODER_MASK"][:1])[0]
    assert (adapted.tokens - plain.tokens).abs().max() > 1e-3  # prepared through the adapted to_k / to_v
    assert (base.tokens - engine.module.prepare(batch["ENCODER_STATES"][2:3],
                                                batch["ENCODER_MASK"][2:3])[0].tokens).abs().max() < 1e-6


def _write_adapter(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / ADAPTER_FILE), metadata={"format": "pt"})


def test_adapters_that_do_not_fit_the_model_are_refused_naming_the_problem(tmp_path, golden_dir, golden_ckpt) -> None:
    from acestep_triton.models.transformer import ACEStepTransformer

    tiny = load_file(str(golden_dir / TINY / ADAPTER_FILE))
    _write_adapter(tmp_path / "other-module", {**tiny, "genre_embedder.lora_A.weight": torch.zeros(4, 32),
                                               "genre_embedder.lora_B.weight": torch.zeros(32, 4)})
    _write_adapter(tmp_path / "wrong-shape", {**tiny, "speaker_embedder.lora_A.weight": torch.zeros(4, 7)})
    _write_adapter(tmp_path / "half", {k: v for k, v in tiny.items() if k != "speaker_embedder.lora_B.weight"})
    _write_adapter(tmp_path / "kohya", {"lora_unet_x.lora_down.weight": torch.zeros(4, 32)})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / ADAPTER_FILE).write_bytes(b"not safetensors")
    model = ACEStepTransformer.from_pretrained(golden_ckpt / "ace_step_transformer")
    store = AdapterStore(model, AdapterSettings(tmp_path), torch.device("cpu"), torch.float32)
    for name, message in [("other-module", "genre_embedder"), ("wrong-shape", "speaker_embedder"),
                          ("half", "lacks"), ("kohya", "not a LoRA weight"), ("broken", "not readable")]:
        with pytest.raises(ParameterError, match=message) as info:
            store.adapter_id(name)
        assert info.value.field == FIELD, name


def test_least_recently_used_adapters_are_unloaded_past_the_bound_and_reload_the_same(tmp_path, golden_dir,
                                                                                      golden_ckpt) -> None:
    from acestep_triton.checkpoint import validate_checkpoint

    for name in ("a", "b"):
        shutil.copytree(golden_dir / TINY, tmp_path / name)
    engine = load_engines(["condition_encoder"], validate_checkpoint(golden_ckpt),
                          adapters=AdapterSettings(tmp_path, hub=False, max_resident=1))["condition_encoder"]
    store, inputs = engine.adapters, _encoder_batch(2)
    first = engine.run({**inputs, **_rows(store, ["a", "a"], [0.5, 0.5])})["ENCODER_STATES"]
    assert store.resident == ("a",)
    engine.run({**inputs, **_rows(store, ["b", NO_LORA], [0.5, 1.0])})
    assert store.resident == ("b",)
    both = engine.run({**inputs, **_rows(store, ["a", "b"], [0.5, 0.5])})["ENCODER_STATES"]
    assert len(store.resident) == 1  # the batch ran with both; one stays loaded
    torch.testing.assert_close(both, first, rtol=0, atol=1e-6)


# --- parity with upstream: golden l1, l2, l3 ----------------------------------------------------------

def lora_case(golden_dir: Path, case: str) -> GenerationParams:
    """A golden LoRA case as a request (golden_cases.ext_request): upstream's adapter path is `tiny-lora`
    of our adapters directory."""
    params, _ = ext_request(golden_dir, case)
    return replace(params, lora_name_or_path=NO_LORA if params.lora_name_or_path == NO_LORA else TINY)


def golden_waveform(golden_dir: Path, case: str) -> np.ndarray:
    """The case's final waveform [2, N] (its WAV file is that tensor, bit-exactly)."""
    samples, _ = sf.read(golden_dir / "ext" / f"{case}.wav", dtype="float32", always_2d=True)
    return samples.T


def _max_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.slow  # three whole generations
def test_l1_l2_l3_in_process_on_one_pipeline(golden_dir, golden_ckpt, lyric_vocab, settings) -> None:
    """l1 (the adapter at 0.7), then l2 (none: the base model again), then l3 (the adapter again) on one
    pipeline. Upstream runs l3 without the adapter (its stale-state bug); here l3 equals l1."""
    from acestep_triton.pipeline import Text2MusicPipeline

    pipeline = Text2MusicPipeline.from_checkpoint(golden_ckpt, lyric_vocab, adapters=settings)
    captured = {}
    encode, decode = pipeline.engines["condition_encoder"], pipeline.engines["dcae_decoder"]

    def encode_spy(batch):
        out = encode(batch)
        captured["states"] = out["ENCODER_STATES"]
        return out

    def decode_spy(batch):
        captured["latents"] = batch["LATENTS"]
        return decode(batch)

    pipeline.engines.update(condition_encoder=encode_spy, dcae_decoder=decode_spy)
    results = {}
    for case, reference in (("l1_lora_w07", "l1_lora_w07"), ("l2_lora_unloaded", "l2_lora_unloaded"),
                            ("l3_lora_reload_quirk", "l1_lora_w07")):
        params = lora_case(golden_dir, case)
        waveform = pipeline(params).waveforms[0]
        ref = load_file(str(golden_dir / "ext" / f"{reference}.safetensors"))
        for row, branch in enumerate(("cond", "null")):
            expected = ref[f"encoder_hidden_states_{branch}"][0]
            err = _max_err(captured["states"][row], expected)
            assert err < 1e-5 * max(1.0, expected.abs().max().item()), f"{case}: {branch} states error {err:.2e}"
        assert _max_err(captured["latents"][0], ref["final_latents"][0]) < 1e-4, case
        results[case] = err = _max_err(waveform, golden_waveform(golden_dir, reference))
        assert err < 1e-4, f"{case}: waveform max abs error {err:.2e}"
    assert _max_err(golden_waveform(golden_dir, "l1_lora_w07"), golden_waveform(golden_dir, "l2_lora_unloaded")) > 1e-2


# --- through a real tritonserver ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_server(triton_server_factory, tmp_path_factory, tiny_checkpoint, lyric_vocab, golden_dir):
    """The cpu profile with the golden folder as adapters directory, and queue delays long enough that
    concurrent requests always share condition_encoder and dit_step batches (each step of a lone
    request waits them out: 0.3 s)."""
    from export.build_repository import build_repository

    delays = {"queue_delay_us": 300_000, "dit_queue_delay_us": 300_000}
    repo = build_repository("cpu", tiny_checkpoint, tmp_path_factory.mktemp("lora_repository"), lyric_vocab,
                            overrides=delays, adapters_dir=golden_dir)
    return triton_server_factory(repo)


def _infer(server, params: GenerationParams, overrides=None):
    """The ensemble over gRPC with the LoRA inputs of `params` (and `overrides`)."""
    from tests.test_triton_repository import infer

    lora = {"LORA_NAME_OR_PATH": np.array([params.lora_name_or_path.encode()], dtype=np.object_),
            "LORA_WEIGHT": np.array([params.lora_weight], dtype=np.float32)}
    return infer(server, params, overrides={**lora, **(overrides or {})})


def _stats(server, model: str) -> tuple[int, int]:
    """(requests, executions) of `model`: fewer executions than requests means requests shared a batch."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    stats = client.get_inference_statistics(model)["model_stats"][0]
    return int(stats["inference_stats"]["success"]["count"]), int(stats["execution_count"])


def test_lora_isolation_through_triton(lora_server, golden_dir) -> None:
    """l1 (adapter) and l2 (base) alone match upstream; sent together, their rows share
    condition_encoder and dit_step batches, and each equals its solo run."""
    cases = {"l1_lora_w07": lora_case(golden_dir, "l1_lora_w07"), "l2_lora_unloaded": lora_case(golden_dir, "l2_lora_unloaded")}
    solo = {case: _infer(lora_server, params).waveforms[0] for case, params in cases.items()}
    for case, waveform in solo.items():
        assert _max_err(waveform, golden_waveform(golden_dir, case)) < 1e-4, case
    shared = ("condition_encoder", "dit_step")
    before = {model: _stats(lora_server, model) for model in shared}
    results: dict[str, np.ndarray] = {}
    errors: list[BaseException] = []

    def run(case: str) -> None:
        try:
            results[case] = _infer(lora_server, cases[case]).waveforms[0]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(case,)) for case in cases]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    for case, waveform in results.items():
        assert _max_err(waveform, solo[case]) < 1e-5, case
    for model in shared:
        requests, executions = (a - b for a, b in zip(_stats(lora_server, model), before[model]))
        assert executions < requests, f"{model}: the requests never shared a batch ({executions} for {requests})"


@pytest.mark.parametrize(("lora", "weight", "field"), [
    ("no-such-adapter", 1.0, FIELD), ("../golden/tiny-lora", 1.0, FIELD), ("/etc", 1.0, FIELD),
    (TINY, 1.5, "lora_weight"),
])
def test_bad_adapters_through_triton_are_invalid_arguments_naming_the_field(lora_server, lora, weight, field) -> None:
    from tritonclient.utils import InferenceServerException

    params = GenerationParams(prompt="pop", lyrics="", audio_duration=1.0, infer_step=2, actual_seeds=(1,))
    overrides = {"LORA_NAME_OR_PATH": np.array([lora.encode()], dtype=np.object_),
                 "LORA_WEIGHT": np.array([weight], dtype=np.float32)}
    with pytest.raises(InferenceServerException, match=field) as info:
        _infer(lora_server, params, overrides)
    assert "INVALID_ARG" in str(info.value.status())
