"""Request -> the token rows every guidance branch is encoded from (the `preprocess` stage).

Upstream encodes up to three condition branches with different inputs:
  cond      text states,                          lyric ids,          no ERG
  null      ERG-tag text states (or zeros),       lyric ids + ERG-lyric, if use_erg_lyric;
            zeros text,                           zero lyric ids,      otherwise
  no_lyric  text states,                          lyric ids + ERG-lyric, if use_erg_lyric;
            text states,                          zero lyric ids,      otherwise
            (only with double-condition guidance)
Here each branch is one row, so the text encoder and the condition encoder each run once,
batched, and their per-row scales (TEXT_Q_SCALE, TEXT_SCALE, LYRIC_Q_SCALE) carry the ERG
switches instead of hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from acestep_triton.contract import BRANCHES, COND, NO_LYRIC, NULL, GenerationParams, uses_double_condition
from acestep_triton.sampling.seeds import resolve_duration, resolve_seeds
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
    duration: float  # seconds actually generated (-1 resolved from the first seed)

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
            "DURATION": np.asarray([self.duration], dtype=np.float32),
        }


def warm_up(tokenize_text: Callable[[str], tuple[Sequence[int], Sequence[int]]],
            tokenize_lyrics: Callable[[str], Sequence[int]]) -> None:
    """Tokenise WARM_UP_PARAMS once (the result is dropped)."""
    prepare_request(WARM_UP_PARAMS, tokenize_text, tokenize_lyrics)


def prepare_request(
    params: GenerationParams,
    tokenize_text: Callable[[str], tuple[Sequence[int], Sequence[int]]],
    tokenize_lyrics: Callable[[str], Sequence[int]],
) -> PreparedRequest:
    """Tokenize once and lay out one row per guidance branch."""
    seeds = resolve_seeds(params.actual_seeds)
    text_ids, text_mask = tokenize_text(params.prompt)
    if params.lyrics:
        lyric_ids = list(tokenize_lyrics(params.lyrics))
        lyric_mask = [1] * len(lyric_ids)
    else:
        lyric_ids, lyric_mask = EMPTY_LYRICS
    erg_lyric, erg_tag = params.use_erg_lyric, params.use_erg_tag
    zero_lyrics = [0] * len(lyric_ids)

    # branch -> (text q scale, text scale, lyric ids, lyric q scale)
    rows = {
        COND: (1.0, 1.0, lyric_ids, 1.0),
        NULL: (
            (ERG_Q_SCALE if erg_tag else 1.0, 1.0 if erg_tag else 0.0, lyric_ids, ERG_Q_SCALE)
            if erg_lyric
            else (1.0, 0.0, zero_lyrics, 1.0)
        ),
        NO_LYRIC: (1.0, 1.0, lyric_ids, ERG_Q_SCALE) if erg_lyric else (1.0, 1.0, zero_lyrics, 1.0),
    }
    branches = BRANCHES if uses_double_condition(params) else BRANCHES[:2]
    k = len(branches)

    def column(values: list[float]) -> np.ndarray:
        return np.asarray(values, dtype=np.float32).reshape(k, 1)

    return PreparedRequest(
        branches=branches,
        text_ids=np.tile(np.asarray(text_ids, dtype=np.int64), (k, 1)),
        text_mask=np.tile(np.asarray(text_mask, dtype=np.int64), (k, 1)),
        text_q_scale=column([rows[b][0] for b in branches]),
        text_scale=column([rows[b][1] for b in branches]),
        lyric_ids=np.asarray([rows[b][2] for b in branches], dtype=np.int64),
        lyric_mask=np.tile(np.asarray(lyric_mask, dtype=np.int64), (k, 1)),
        lyric_q_scale=column([rows[b][3] for b in branches]),
        seeds=seeds,
        duration=resolve_duration(params.audio_duration, seeds[0]),
    )
