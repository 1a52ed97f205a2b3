"""ACEStepTransformer: checkpoint layout, parity with the official implementation, batching."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from acestep_triton.specs import ERG_Q_SCALE
from acestep_triton.models.transformer import TINY_LYRIC_ENCODER_KEY, ACEStepTransformer
from tests.golden_cases import GOLDEN_CASES

DECODE_KEY = re.compile(r"step(\d+)_decode(\d+)_(cond|null|no_lyric)(_erg)?")
LOAD_WARNINGS = ("were not used", "newly initialized", "not expected", "missing", "unexpected")


def _atol(reference: torch.Tensor) -> float:
    """The golden README's tolerance for teacher-forced float32 stages."""
    return 1e-5 * max(1.0, reference.abs().max().item())


def _assert_close(actual: torch.Tensor, reference: torch.Tensor) -> None:
    torch.testing.assert_close(actual, reference, rtol=0.0, atol=_atol(reference))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _load_without_warnings(folder: Path) -> ACEStepTransformer:
    """from_pretrained, failing on any diffusers warning about keys or config attributes."""
    records = _Records()
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(records)
    try:
        model = ACEStepTransformer.from_pretrained(folder)
    finally:
        diffusers_logger.removeHandler(records)
    bad = [m for m in records.messages if any(word in m for word in LOAD_WARNINGS)]
    assert not bad, bad
    return model.eval()


@pytest.fixture(scope="module")
def model(golden_ckpt: Path) -> ACEStepTransformer:
    torch.set_num_threads(2)
    return _load_without_warnings(golden_ckpt / "ace_step_transformer")


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
    return {
        case: (load_file(golden_dir / f"{case}.safetensors"), json.loads((golden_dir / f"{case}.json").read_text()))
        for case in GOLDEN_CASES
    }


def test_full_size_state_dict_matches_published(golden_dir: Path) -> None:
    config = ACEStepTransformer.load_config(golden_dir / "full-size-configs" / "ace_step_transformer")
    with torch.device("meta"):
        model = ACEStepTransformer.from_config(config)
    published = {}
    for line in (golden_dir / "state_dict_full_size.tsv").read_text().splitlines()[1:]:
        component, name, shape, _dtype, _kind, _numel = line.split("\t")
        if component == "ace_step_transformer":
            published[name] = [int(size) for size in shape.split("x")]
    ours = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    assert sorted(set(ours) - set(published)) == []
    assert sorted(set(published) - set(ours)) == []
    assert {name: shape for name, shape in ours.items() if shape != published[name]} == {}


def test_loads_published_class_name(golden_ckpt: Path, tmp_path: Path) -> None:
    """The published config says `Transformer2DModel`; the tiny one records its Conformer sizes."""
    folder = tmp_path / "ace_step_transformer"
    shutil.copytree(golden_ckpt / "ace_step_transformer", folder)
    config = json.loads((folder / "config.json").read_text())
    config["_class_name"] = "Transformer2DModel"
    (folder / "config.json").write_text(json.dumps(config))
    model = _load_without_warnings(folder)
    sizes = config[TINY_LYRIC_ENCODER_KEY]
    assert len(model.lyric_encoder.encoders) == sizes["num_blocks"]
    attention = model.lyric_encoder.encoders[0].self_attn
    assert attention.heads == sizes["attention_heads"]
    assert model.lyric_encoder.encoders[0].feed_forward.w_1.out_features == sizes["linear_units"]


@pytest.mark.parametrize("case", GOLDEN_CASES)
@torch.no_grad()
def test_encode_matches_golden(model: ACEStepTransformer, golden, case: str) -> None:
    tensors, meta = golden[case]
    text, text_mask = tensors["text_last_hidden_state"], tensors["text_attention_mask"]
    lyric_ids, lyric_mask = tensors["lyric_token_ids"], tensors["lyric_mask"]
    speaker = tensors["speaker_embeds"]

    states, mask = model.encode(text, text_mask, speaker, lyric_ids, lyric_mask)
    _assert_close(states, tensors["encoder_hidden_states_cond"])
    assert torch.equal(mask, tensors["encoder_hidden_mask_cond"])

    null_call = next(call for call in meta["encode_calls"] if call["label"] == "null")
    if null_call["lyric_erg_hooks_active"]:
        null_text = tensors.get("text_last_hidden_state_erg_null", torch.zeros_like(text))
        states, mask = model.encode(null_text, text_mask, torch.zeros_like(speaker), lyric_ids, lyric_mask,
                                    lyric_q_scale=ERG_Q_SCALE)
    else:
        states, mask = model.encode(torch.zeros_like(text), text_mask, torch.zeros_like(speaker),
                                    torch.zeros_like(lyric_ids), lyric_mask)
    _assert_close(states, tensors["encoder_hidden_states_null"])
    assert torch.equal(mask, tensors["encoder_hidden_mask_null"])


def _decode_inputs(tensors: dict[str, torch.Tensor], meta: dict, key: str):
    """Teacher-forced inputs of one recorded decode call: (latents, encoder label, timestep, erg)."""
    step, index, label, erg = DECODE_KEY.fullmatch(key).groups()
    call = next(c for c in meta["decode_calls"] if c["step"] == int(step) and c["index_in_step"] == int(index))
    assert call["encoder_hidden_states"] == label
    assert bool(call["diffusion_erg_hooks_active"]) == bool(erg)
    latents = tensors["init_noise"] if int(step) == 0 else tensors[f"step{int(step) - 1:02d}_latents_out"]
    return latents, label, torch.tensor([call["timestep"]], dtype=torch.float32), bool(erg)


@pytest.mark.parametrize("case", GOLDEN_CASES)
@torch.no_grad()
def test_decode_matches_golden(model: ACEStepTransformer, golden, case: str) -> None:
    tensors, meta = golden[case]
    keys = [key for key in tensors if DECODE_KEY.fullmatch(key)]
    assert len(keys) >= 2
    for key in keys:
        latents, label, timestep, erg = _decode_inputs(tensors, meta, key)
        velocity = model.decode(
            latents,
            torch.ones(latents.shape[0], latents.shape[-1]),
            tensors[f"encoder_hidden_states_{label}"],
            tensors[f"encoder_hidden_mask_{label}"],
            timestep,
            q_scale=torch.tensor([ERG_Q_SCALE]) if erg else None,
        )
        _assert_close(velocity, tensors[key])


@torch.no_grad()
def test_batched_guidance_branches_equal_single_decodes(model: ACEStepTransformer, golden) -> None:
    """cond and ERG-null side by side in one decode give the recorded separate decodes."""
    tensors, meta = golden["a_euler_apg_erg"]
    latents, _, timestep, _ = _decode_inputs(tensors, meta, "step02_decode0_cond")
    frames = latents.shape[-1]
    velocity = model.decode(
        latents.repeat(2, 1, 1, 1),
        torch.ones(2, frames),
        torch.cat([tensors["encoder_hidden_states_cond"], tensors["encoder_hidden_states_null"]]),
        torch.cat([tensors["encoder_hidden_mask_cond"], tensors["encoder_hidden_mask_null"]]),
        timestep.repeat(2),
        q_scale=torch.tensor([1.0, ERG_Q_SCALE]),
    )
    _assert_close(velocity[:1], tensors["step02_decode0_cond"])
    _assert_close(velocity[1:], tensors["step02_decode1_null_erg"])
    single = model.decode(latents, torch.ones(1, frames), tensors["encoder_hidden_states_null"],
                          tensors["encoder_hidden_mask_null"], timestep, q_scale=torch.tensor([ERG_Q_SCALE]))
    _assert_close(velocity[1:], single)


def _pad(x: torch.Tensor, length: int, fill: torch.Tensor) -> torch.Tensor:
    """Pad dim 1 of x [1, L, ...] to `length` with the leading rows of `fill`."""
    return torch.cat([x, fill[:, : length - x.shape[1]].to(x.dtype)], dim=1)


@torch.no_grad()
def test_padded_batch_equals_solo_runs(model: ACEStepTransformer, golden) -> None:
    """Two requests of different prompt, lyric and latent lengths, padded into one batch with
    garbage in the padding: each valid region equals the request's own unpadded encode + decode."""
    generator = torch.Generator().manual_seed(0)
    a, _ = golden["a_euler_apg_erg"]
    b, _ = golden["b_heun_cfg_noerg"]
    solo = [
        dict(text=a["text_last_hidden_state"], text_mask=a["text_attention_mask"], lyric_ids=a["lyric_token_ids"],
             lyric_mask=a["lyric_mask"], latents=a["init_noise"], timestep=900.0, q_scale=1.0),
        dict(text=b["text_last_hidden_state"], text_mask=b["text_attention_mask"],
             lyric_ids=b["lyric_token_ids"][:, :60], lyric_mask=b["lyric_mask"][:, :60],
             latents=b["init_noise"][..., :40], timestep=400.0, q_scale=ERG_Q_SCALE),
    ]
    text_len = max(item["text"].shape[1] for item in solo)
    lyric_len = max(item["lyric_ids"].shape[1] for item in solo)
    frames = max(item["latents"].shape[-1] for item in solo)
    assert {item["text"].shape[1] for item in solo} != {text_len}  # text padding sits mid-sequence

    speaker = torch.zeros(1, model.config.speaker_embedding_dim)
    solo_out = []
    for item in solo:
        states, mask = model.encode(item["text"], item["text_mask"], speaker, item["lyric_ids"], item["lyric_mask"])
        velocity = model.decode(item["latents"], torch.ones(1, item["latents"].shape[-1]), states, mask,
                                torch.tensor([item["timestep"]]), q_scale=torch.tensor([item["q_scale"]]))
        solo_out.append((states[0, mask[0] > 0], velocity))

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    text = torch.cat([_pad(i["text"], text_len, noise(1, text_len, i["text"].shape[2])) for i in solo])
    text_mask = torch.cat([_pad(i["text_mask"], text_len, torch.zeros(1, text_len)) for i in solo])
    lyric_ids = torch.cat([_pad(i["lyric_ids"], lyric_len, torch.randint(0, 100, (1, lyric_len), generator=generator))
                           for i in solo])
    lyric_mask = torch.cat([_pad(i["lyric_mask"], lyric_len, torch.zeros(1, lyric_len)) for i in solo])
    latents = torch.cat([_pad(i["latents"].movedim(-1, 1), frames, noise(1, frames, 8, 16)).movedim(1, -1)
                         for i in solo])
    attention_mask = torch.cat([_pad(torch.ones(1, i["latents"].shape[-1]), frames, torch.zeros(1, frames))
                                for i in solo])

    states, mask = model.encode(text, text_mask, speaker.repeat(2, 1), lyric_ids, lyric_mask)
    velocity = model.decode(latents, attention_mask, states, mask, torch.tensor([i["timestep"] for i in solo]),
                            q_scale=torch.tensor([i["q_scale"] for i in solo]))

    for row, (item, (solo_states, solo_velocity)) in enumerate(zip(solo, solo_out)):
        _assert_close(states[row, mask[row] > 0], solo_states)
        valid_frames = item["latents"].shape[-1]
        _assert_close(velocity[row : row + 1, ..., :valid_frames], solo_velocity)
        assert torch.all(velocity[row, ..., valid_frames:] == 0)
