"""The condition rows `preprocess` lays out for the other tasks, encoded as the official implementation does.

Flow-edit's four rows (source, its unconditional row, target, its unconditional row) have
different prompt and lyric lengths; preprocess pads them to one length with mask 0. Checked here:
each row's tokens, its encoder states on the valid positions, and the transformer's raw output on
those padded rows, against golden/ext's edit case (teacher-forced, 1e-5 * max(1, |ref|)).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from acestep_triton.checkpoint import validate_checkpoint
from acestep_triton.contract import EDIT_BRANCHES, EDIT_SOURCE, EDIT_SOURCE_NULL, GenerationParams
from acestep_triton.engines import load_engines
from acestep_triton.lyrics import LyricTokenizer
from acestep_triton.preprocess import prepare_request
from acestep_triton.sampling.conditions import Conditions, branch_inputs
from acestep_triton.sampling.tasks import edit_noised
from acestep_triton.text_tokenizer import TextTokenizer
from tests.golden_cases import ext_request, ext_tensors

STAGE_TOL = 1e-5


def assert_within(actual: torch.Tensor, ref: torch.Tensor) -> None:
    assert actual.shape == ref.shape, (actual.shape, ref.shape)
    torch.testing.assert_close(actual, ref, rtol=0.0, atol=STAGE_TOL * max(1.0, ref.abs().max().item()))


@pytest.fixture(scope="module")
def tokenizers(golden_ckpt: Path, lyric_vocab: Path):
    ckpt = validate_checkpoint(golden_ckpt)
    return TextTokenizer.from_pretrained(ckpt.text_encoder).tokenize_one, LyricTokenizer.from_file(lyric_vocab).tokenize


@pytest.fixture(scope="module")
def engines(golden_ckpt: Path):
    return load_engines(("text_encoder", "condition_encoder", "dit_step"), validate_checkpoint(golden_ckpt))


@pytest.fixture(scope="module")
def edit(golden_dir: Path, tokenizers):
    params, source = ext_request(golden_dir, "ed1_edit_navg1")
    return params, prepare_request(params, *tokenizers, source), ext_tensors(golden_dir, "ed1_edit_navg1")


def test_edit_rows_are_the_reference_tokens_padded(edit) -> None:
    _, prepared, g = edit
    assert prepared.branches == EDIT_BRANCHES
    rows = {
        0: (g["text_input_ids"][0], g["lyric_token_ids"][0], g["lyric_mask"][0]),
        2: (g["text_input_ids_call2"][0], g["target_lyric_token_ids"][0], g["target_lyric_mask"][0]),
    }
    for k, (text, lyrics, lyric_mask) in rows.items():
        for row, mask_on in ((k, True), (k + 1, False)):  # each condition, then its unconditional row
            n, m = len(text), len(lyrics)
            assert prepared.text_ids[row, :n].tolist() == text.tolist() and not prepared.text_ids[row, n:].any()
            assert prepared.text_mask[row, :n].all() and not prepared.text_mask[row, n:].any()
            expected_ids = lyrics.tolist() if mask_on else [0] * m
            assert prepared.lyric_ids[row, :m].tolist() == expected_ids and not prepared.lyric_ids[row, m:].any()
            assert prepared.lyric_mask[row].tolist() == (lyric_mask.tolist() if mask_on else [0] * m) + [0] * (
                prepared.lyric_mask.shape[1] - m)
    assert prepared.text_scale[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert prepared.text_q_scale.min() == prepared.lyric_q_scale.min() == 1.0  # edit has no ERG
    assert prepared.text_ids.shape[1] != len(rows[0][0]) or prepared.lyric_ids.shape[1] != len(rows[0][1])


@pytest.fixture(scope="module")
def conditions(edit, engines) -> Conditions:
    _, prepared, _ = edit
    rows = {name: torch.from_numpy(array) for name, array in prepared.tensors().items()}
    text_states = engines["text_encoder"].run(rows)["TEXT_STATES"]
    out = engines["condition_encoder"].run({**rows, "TEXT_STATES": text_states})
    return Conditions(prepared.branches, out["ENCODER_STATES"], out["ENCODER_MASK"])


def test_padded_rows_encode_as_the_reference_rows(edit, conditions) -> None:
    _, _, g = edit
    reference = {0: ("edit_src", 0), 1: ("edit_src", 1), 2: ("edit_tar", 0), 3: ("edit_tar", 1)}
    for row, (name, ref_row) in reference.items():
        ref_states, ref_mask = g[f"encoder_hidden_states_{name}"][ref_row], g[f"encoder_hidden_mask_{name}"][ref_row]
        ours_mask = conditions.mask[row]
        # the same tokens are valid, in the same order: speaker, prompt, lyrics (padding between them masked)
        assert ours_mask.sum() == ref_mask.sum()
        assert_within(conditions.states[row][ours_mask > 0], ref_states[ref_mask > 0])


@pytest.mark.parametrize("step", [1, 2])
def test_transformer_on_padded_rows_matches_the_reference(edit, conditions, engines, step: int) -> None:
    """Source rows at zt_src and target rows at zt_tar in one dit_step batch, as the loop sends them."""
    params, _, g = edit
    key = f"step{step:02d}_avg0"
    t = g[f"step{step:02d}_t_i"]
    # the pair is stored for the first averaged step; later ones are rebuilt from its noise (test_tasks)
    zt_src, zt_tar = edit_noised(g["src_latents"], g[f"step{step - 1:02d}_latents_out"] if step > 1 else g["src_latents"],
                                 g[f"{key}_fwd_noise"], t)
    if f"{key}_zt_src" in g:
        assert torch.equal(zt_src, g[f"{key}_zt_src"]) and torch.equal(zt_tar, g[f"{key}_zt_tar"])
    latents = torch.cat([zt_src, zt_src, zt_tar, zt_tar])
    t = t * 1000
    inputs = branch_inputs(conditions, EDIT_BRANCHES, 1, latents.shape[-1], params.use_erg_diffusion)
    velocity = engines["dit_step"].run({"LATENTS": latents, "TIMESTEP": t.expand(4).reshape(-1, 1), **inputs})["VELOCITY"]
    assert_within(velocity[:2], g[f"{key}_decode0_edit_src"])
    assert_within(velocity[2:], g[f"{key}_decode1_edit_tar"])
    assert inputs["Q_SCALE"].eq(1.0).all()  # ERG-diffusion never touches edit's rows


def test_retake_seeds_pair_with_the_seeds_item_by_item(tokenizers) -> None:
    base = dict(prompt="pop", lyrics="", audio_duration=1.0, task="retake")
    prepared = prepare_request(GenerationParams(**base, actual_seeds=(1, 2, 3), retake_seeds=(7,)), *tokenizers)
    assert prepared.seeds == (1, 2, 3) and prepared.retake_seeds == (7, 7, 7)
    prepared = prepare_request(GenerationParams(**base, retake_seeds=(7, 8)), *tokenizers)
    assert len(prepared.seeds) == 2 and prepared.retake_seeds == (7, 8)
    drawn = prepare_request(GenerationParams(**base, actual_seeds=(1, 2)), *tokenizers).retake_seeds
    assert len(drawn) == 2 and all(0 <= s < 2**32 for s in drawn)
    assert prepared.tensors()["RETAKE_SEEDS_USED"].tolist() == [7, 8]


def test_a_source_task_reports_the_source_length(edit) -> None:
    _, prepared, g = edit
    frames = g["src_latents"].shape[-1]
    assert prepared.duration == pytest.approx(frames * 512 * 8 / 44100)
    assert np.float32(prepared.duration) == prepared.tensors()["DURATION"][0]
    assert prepared.branches[:2] == (EDIT_SOURCE, EDIT_SOURCE_NULL)
