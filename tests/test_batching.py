"""Ragged requests batched into one call come back with exactly their own rows and lengths."""

from __future__ import annotations

import torch

from acestep_triton.batching import collate, split
from acestep_triton.checkpoint import validate_checkpoint
from acestep_triton.registry import component_spec


def _dit_request(rows: int, frames: int, tokens: int, width: int) -> dict[str, torch.Tensor]:
    return {
        "LATENTS": torch.randn(rows, 8, 16, frames),
        "ATTENTION_MASK": torch.ones(rows, frames),
        "ENCODER_STATES": torch.randn(rows, tokens, width),
        "ENCODER_MASK": torch.ones(rows, tokens),
        "TIMESTEP": torch.full((rows, 1), 500.0),
        "Q_SCALE": torch.ones(rows, 1),
    }


def test_collate_pads_ragged_inputs_and_masks(golden_ckpt) -> None:
    spec = component_spec("dit_step", validate_checkpoint(golden_ckpt))
    a, b = _dit_request(2, 5, 7, 32), _dit_request(3, 9, 4, 32)
    batch = collate(spec, [a, b])
    assert batch["LATENTS"].shape == (5, 8, 16, 9)
    assert batch["ENCODER_STATES"].shape == (5, 7, 32)
    assert torch.equal(batch["LATENTS"][:2, ..., :5], a["LATENTS"])
    assert batch["LATENTS"][:2, ..., 5:].abs().sum() == 0
    assert batch["ATTENTION_MASK"][:2].sum(dim=1).tolist() == [5.0, 5.0]
    assert batch["ENCODER_MASK"][2:].sum(dim=1).tolist() == [4.0, 4.0, 4.0]
    assert batch["TIMESTEP"].shape == (5, 1)


def test_split_returns_each_request_its_rows_and_length(golden_ckpt) -> None:
    spec = component_spec("dit_step", validate_checkpoint(golden_ckpt))
    requests = [_dit_request(2, 5, 7, 32), _dit_request(3, 9, 4, 32), _dit_request(1, 9, 7, 32)]
    batch = collate(spec, requests)
    velocity = batch["LATENTS"] * 2.0
    parts = split(spec, requests, {"VELOCITY": velocity})
    assert [p["VELOCITY"].shape for p in parts] == [(2, 8, 16, 5), (3, 8, 16, 9), (1, 8, 16, 9)]
    for request, part in zip(requests, parts):
        assert torch.equal(part["VELOCITY"], request["LATENTS"] * 2.0)


def test_text_encoder_outputs_follow_token_length(golden_ckpt) -> None:
    spec = component_spec("text_encoder", validate_checkpoint(golden_ckpt))
    requests = [
        {"TEXT_IDS": torch.ones(2, 3, dtype=torch.long), "TEXT_MASK": torch.ones(2, 3, dtype=torch.long),
         "TEXT_Q_SCALE": torch.ones(2, 1)},
        {"TEXT_IDS": torch.ones(1, 6, dtype=torch.long), "TEXT_MASK": torch.ones(1, 6, dtype=torch.long),
         "TEXT_Q_SCALE": torch.ones(1, 1)},
    ]
    batch = collate(spec, requests)
    assert batch["TEXT_MASK"].tolist()[0] == [1, 1, 1, 0, 0, 0]
    parts = split(spec, requests, {"TEXT_STATES": torch.zeros(3, 6, 32)})
    assert [p["TEXT_STATES"].shape for p in parts] == [(2, 3, 32), (1, 6, 32)]
