"""UMT5 text encoder and its ERG-null variant against the official implementation's golden outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import UMT5Config, UMT5EncoderModel

from acestep_triton.checkpoint import TEXT_ENCODER_DIR
from acestep_triton.specs import ERG_Q_SCALE
from acestep_triton.models.text_encoder import (
    ERG_TAG_BLOCKS,
    TEXT_MAX_TOKENS,
    ScaledOutput,
    TextEncoder,
    erg_view,
)
from tests.golden_cases import GOLDEN_CASES

ERG_TAG_CASES = ("a_euler_apg_erg", "e_empty_lyrics")  # use_erg_tag on
STAGE_TOL = 1e-5  # atol = STAGE_TOL * max(1, max|ref|)


def assert_within(actual: torch.Tensor, ref: torch.Tensor, rel_tol: float = STAGE_TOL) -> None:
    assert actual.shape == ref.shape
    torch.testing.assert_close(actual, ref, rtol=0.0, atol=rel_tol * max(1.0, ref.abs().max().item()))


@pytest.fixture(scope="module")
def text_encoder(golden_ckpt) -> TextEncoder:
    torch.set_num_threads(2)
    return TextEncoder.from_pretrained(golden_ckpt / TEXT_ENCODER_DIR)


@pytest.fixture(scope="module", params=GOLDEN_CASES)
def case(request, golden_dir):
    name = request.param
    prompt = json.loads((golden_dir / f"{name}.json").read_text())["call_kwargs"]["prompt"]
    return prompt, load_file(golden_dir / f"{name}.safetensors")


def test_tokenize_matches_golden(text_encoder, case):
    prompt, golden = case
    ids, mask = text_encoder.tokenize([prompt])
    assert ids.dtype == mask.dtype == torch.int64
    assert torch.equal(ids, golden["text_input_ids"])
    assert torch.equal(mask, golden["text_tokenizer_attention_mask"])
    assert torch.equal(mask, golden["text_attention_mask"])
    if "text_input_ids_call1" in golden:  # the ERG-null path tokenizes again, identically
        assert torch.equal(ids, golden["text_input_ids_call1"])
        assert torch.equal(mask, golden["text_tokenizer_attention_mask_call1"])


def test_tokenize_truncates_and_pads(text_encoder):
    ids, mask = text_encoder.tokenize(["drums " * 400, "piano"])
    assert ids.shape == mask.shape == (2, TEXT_MAX_TOKENS)
    assert mask[0].all() and mask[1].sum() < TEXT_MAX_TOKENS
    assert (ids[1][mask[1] == 0] == text_encoder.tokenizer.pad_token_id).all()


def test_encode_matches_golden(text_encoder, case):
    _, golden = case
    states = text_encoder.encode(golden["text_input_ids"], golden["text_attention_mask"])
    assert_within(states, golden["text_last_hidden_state"])


@pytest.mark.parametrize("name", ERG_TAG_CASES)
def test_erg_null_matches_golden(text_encoder, golden_dir, name):
    golden = load_file(golden_dir / f"{name}.safetensors")
    ids, mask = golden["text_input_ids"], golden["text_attention_mask"]
    erg_states = text_encoder.encode(ids, mask, erg=True)
    assert_within(erg_states, golden["text_last_hidden_state_erg_null"])
    assert (erg_states - golden["text_last_hidden_state"]).abs().max() > 1e-2  # ERG really changes the states


def test_erg_leaves_plain_model_untouched(text_encoder, golden_dir):
    golden = load_file(golden_dir / "a_euler_apg_erg.safetensors")
    ids, mask = golden["text_input_ids"], golden["text_attention_mask"]
    before = {k: v.clone() for k, v in text_encoder.model.state_dict().items()}
    plain_before = text_encoder.encode(ids, mask)
    text_encoder.encode(ids, mask, erg=True)
    text_encoder.encode_rows(ids, mask, torch.tensor([ERG_Q_SCALE]))
    after = text_encoder.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, ScaledOutput) for m in text_encoder.model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in text_encoder.model.modules())
    assert torch.equal(text_encoder.encode(ids, mask), plain_before)
    # the ERG view shares storage with the plain model instead of copying it
    plain_q = text_encoder.model.encoder.block[ERG_TAG_BLOCKS[0]].layer[0].SelfAttention.q
    erg_q = text_encoder.erg_model.encoder.block[ERG_TAG_BLOCKS[0]].layer[0].SelfAttention.q
    assert erg_q.module.weight is plain_q.weight


def test_encode_rows_mixes_plain_and_erg_rows(text_encoder, golden_dir):
    golden = load_file(golden_dir / "e_empty_lyrics.safetensors")
    ids = golden["text_input_ids"].repeat(3, 1)
    mask = golden["text_attention_mask"].repeat(3, 1)
    states = text_encoder.encode_rows(ids, mask, torch.tensor([[1.0], [ERG_Q_SCALE], [1.0]]))
    assert_within(states[[0, 2]], golden["text_last_hidden_state"].repeat(2, 1, 1))
    assert_within(states[1:2], golden["text_last_hidden_state_erg_null"])
    with pytest.raises(ValueError, match="q_scale"):
        text_encoder.encode_rows(ids, mask, torch.ones(2))


def test_too_few_blocks_for_erg_raises(text_encoder):
    config = UMT5Config(vocab_size=350, d_model=32, d_kv=16, d_ff=64, num_layers=max(ERG_TAG_BLOCKS), num_heads=2)
    torch.manual_seed(0)
    small = TextEncoder(UMT5EncoderModel(config), text_encoder.tokenizer)
    ids, mask = small.tokenize(["piano"])
    assert small.encode(ids, mask).shape == (1, ids.shape[1], 32)
    with pytest.raises(ValueError, match=r"use_erg_tag: .*blocks \[8, 9\].* has 9 blocks"):
        small.encode(ids, mask, erg=True)
    with pytest.raises(ValueError, match="use_erg_tag"):
        small.encode_rows(ids, mask, torch.ones(1))
    with pytest.raises(ValueError, match="use_erg_tag"):
        erg_view(small.model, ERG_TAG_BLOCKS, ERG_Q_SCALE)


def test_full_size_state_dict_matches_published(golden_dir) -> None:
    """UMT5 at full size (meta device): every name and shape equals the published umt5-base/."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config.from_json_file(str(golden_dir / "full-size-configs" / "umt5-base" / "config.json"))
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    ours = {name: "x".join(map(str, t.shape)) for name, t in model.state_dict(keep_vars=True).items()}
    published = {}
    for line in (golden_dir / "state_dict_full_size.tsv").read_text().splitlines()[1:]:
        component, name, shape, *_ = line.split("\t")
        if component == "umt5-base":
            published[name] = shape
    assert len(published) == 123
    assert ours == published
    # ERG-tag needs blocks 8 and 9 of the published encoder
    assert len(model.encoder.block) > max(ERG_TAG_BLOCKS)
