"""Request -> the token rows every guidance branch is encoded from (the `preprocess` stage).

Upstream encodes up to three condition branches with different inputs:
  cond      text states,                          lyric ids,          no ERG
  null      ERG-tag text states (or zeros),       lyric ids + ERG-lyric, if use_erg_lyric;
            zeros text,                           zero lyric ids,      otherwise
  no_lyric  text states,                          lyric ids + ERG-lyric, if use_erg_lyric;
            text states,                          zero lyric ids,      otherwise
            (only with double-condition guidance)
Flow-edit (task "edit") has four instead, without ERG: the source prompt and lyrics, its
unconditional row (zero text states, zero lyric ids and a zero lyric mask), and the same two for
the target prompt and lyrics.
Here each branch is one row, so the text encoder and the condition encoder each run once,
batched, and their per-row scales (TEXT_Q_SCALE, TEXT_SCALE, LYRIC_Q_SCALE) carry the ERG
switches instead of hooks. Rows of different lengths (edit's source and target) are zero-padded
with mask 0: the encoders mask the padding and the DiT places condition tokens by their mask, so
each row encodes as it would alone.

The request's source audio is checked here too (sampling.tasks.check_source), so a request that
cannot run fails before any model does, and the result's duration is known.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from acestep_triton.contract import (
    COND,
    EDIT,
    EDIT_SOURCE,
    EDIT_SOURCE_NULL,
    EDIT_TARGET,
    EDIT_TARGET_NULL,
    NO_LYRIC,
    NULL,
    GenerationParams,
    SourceAudio,
    condition_branches,
)
from acestep_triton.geometry import PUBLISHED_GEOMETRY
from acestep_triton.sampling.seeds import resolve_duration, resolve_seeds
from acestep_triton.sampling.tasks import check_source, result_frames
from acestep_triton.specs import ERG_Q_SCALE

EMPTY_LYRICS = ([0], [0])
# Tokenised once when a `preprocess` instance starts, so that what tokenisation loads on first use
# (the language identifier's model, the number spelling) does not fall on a request: with several
# instances, each one's first request paid for it.
WARM_UP_PARAMS = GenerationParams(prompt="warm up", lyrics="[verse]\nwarm up the tokenizers 2 times\n",
                                  actual_seeds=(0,))


@dataclass(frozen=True)
class PreparedRequest:
    """Rows are branches (`branches` order); seeds are batch items."""

    branches: tuple[str, ...]
    text_ids: np.ndarray  # [K, Lt] int64
    text_mask: np.ndarray  # [K, Lt] int64
    text_q_scale: np.ndarray  # [K, 1] float32: ERG-tag
    text_scale: np.ndarray  # [K, 1] float32: 0 zeroes the row's text states
    lyric_ids: np.ndarray  # [K, Ll] int64
    lyric_mask: np.ndarray  # [K, Ll] int64
    lyric_q_scale: np.ndarray  # [K, 1] float32: ERG-lyric
    seeds: tuple[int, ...]  # one per batch item
    retake_seeds: tuple[int, ...]  # one per batch item: the retake generators' seeds
    duration: float  # seconds actually generated (-1 resolved from the first seed; a source's length)

    def tensors(self) -> dict[str, np.ndarray]:
        """The `preprocess` model's outputs (its time aside) by tensor name; the in-process pipeline
        feeds the encoders from the same dict, which picks its inputs by name."""
        return {
            "TEXT_IDS": self.text_ids,
            "TEXT_MASK": self.text_mask,
            "TEXT_Q_SCALE": self.text_q_scale,
            "TEXT_SCALE": self.text_scale,
            "LYRIC_IDS": self.lyric_ids,
            "LYRIC_MASK": self.lyric_mask,
            "LYRIC_Q_SCALE": self.lyric_q_scale,
            "SEEDS": np.asarray(self.seeds, dtype=np.int64),
            "RETAKE_SEEDS_USED": np.asarray(self.retake_seeds, dtype=np.int64),
            "DURATION": np.asarray([self.duration], dtype=np.float32),
        }


def warm_up(tokenize_text: Callable[[str], tuple[Sequence[int], Sequence[int]]],
            tokenize_lyrics: Callable[[str], Sequence[int]]) -> None:
    """Tokenise WARM_UP_PARAMS once (the result is dropped)."""
    prepare_request(WARM_UP_PARAMS, tokenize_text, tokenize_lyrics)


@dataclass(frozen=True)
class _Row:
    """One branch's encoder inputs before padding."""

    text: tuple[Sequence[int], Sequence[int]]  # ids, mask
    text_q_scale: float
    text_scale: float
    lyrics: tuple[Sequence[int], Sequence[int]]  # ids, mask
    lyric_q_scale: float


def _padded(rows: list[Sequence[int]]) -> np.ndarray:
    """[K, longest] int64, each row zero-padded at the end (ids 0, mask 0)."""
    out = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int64)
    for k, row in enumerate(rows):
        out[k, : len(row)] = row
    return out


def prepare_request(
    params: GenerationParams,
    tokenize_text: Callable[[str], tuple[Sequence[int], Sequence[int]]],
    tokenize_lyrics: Callable[[str], Sequence[int]],
    source: SourceAudio | None = None,
) -> PreparedRequest:
    """Check the source, tokenize once and lay out one row per guidance branch.

    Items: one per seed of the longer of actual_seeds and retake_seeds (upstream pairs them item by
    item, a shorter list repeating its last seed, an empty one drawn).
    """
    frames = check_source(params, source)
    items = max(1, len(params.actual_seeds), len(params.retake_seeds))
    seeds = resolve_seeds(params.actual_seeds, items)
    retake_seeds = resolve_seeds(params.retake_seeds, items)
    if frames is None:
        duration = resolve_duration(params.audio_duration, seeds[0])
    else:
        duration = result_frames(params, 0.0, frames) * PUBLISHED_GEOMETRY.frame_seconds

    def lyrics_of(text: str) -> tuple[list[int], list[int]]:
        if not text:
            return EMPTY_LYRICS
        ids = list(tokenize_lyrics(text))
        return ids, [1] * len(ids)

    def silenced(ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """Edit's unconditional lyrics: zero ids and a zero mask of the same length."""
        return [0] * len(ids), [0] * len(ids)

    text, lyrics = tokenize_text(params.prompt), lyrics_of(params.lyrics)
    zero_lyrics = ([0] * len(lyrics[0]), lyrics[1])
    if params.task == EDIT:
        target_text, target_lyrics = tokenize_text(params.edit_target_prompt), lyrics_of(params.edit_target_lyrics)
        rows = {
            EDIT_SOURCE: _Row(text, 1.0, 1.0, lyrics, 1.0),
            EDIT_SOURCE_NULL: _Row(text, 1.0, 0.0, silenced(lyrics[0]), 1.0),
            EDIT_TARGET: _Row(target_text, 1.0, 1.0, target_lyrics, 1.0),
            EDIT_TARGET_NULL: _Row(target_text, 1.0, 0.0, silenced(target_lyrics[0]), 1.0),
        }
    else:
        erg_lyric, erg_tag = params.use_erg_lyric, params.use_erg_tag
        rows = {
            COND: _Row(text, 1.0, 1.0, lyrics, 1.0),
            NULL: (_Row(text, ERG_Q_SCALE if erg_tag else 1.0, 1.0 if erg_tag else 0.0, lyrics, ERG_Q_SCALE)
                   if erg_lyric else _Row(text, 1.0, 0.0, zero_lyrics, 1.0)),
            NO_LYRIC: _Row(text, 1.0, 1.0, lyrics, ERG_Q_SCALE) if erg_lyric else _Row(text, 1.0, 1.0, zero_lyrics, 1.0),
        }
    branches = condition_branches(params)
    chosen = [rows[b] for b in branches]

    def column(values: list[float]) -> np.ndarray:
        return np.asarray(values, dtype=np.float32).reshape(len(chosen), 1)

    return PreparedRequest(
        branches=branches,
        text_ids=_padded([r.text[0] for r in chosen]),
        text_mask=_padded([r.text[1] for r in chosen]),
        text_q_scale=column([r.text_q_scale for r in chosen]),
        text_scale=column([r.text_scale for r in chosen]),
        lyric_ids=_padded([r.lyrics[0] for r in chosen]),
        lyric_mask=_padded([r.lyrics[1] for r in chosen]),
        lyric_q_scale=column([r.lyric_q_scale for r in chosen]),
        seeds=seeds,
        retake_seeds=retake_seeds,
        duration=duration,
    )
