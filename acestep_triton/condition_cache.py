"""Conditions cross into `dit_step` once per request, and are prepared there once per request.

A request's encoder states (ENCODER_STATES [K, L, D], ENCODER_MASK [K, L], one row per guidance
branch) are the same at every denoising step, and they are by far the largest input of a step
(at 60 s, ~9 MB in float32 against ~0.5 MB of latents per row). Sending them with every step costs
a copy through the python backend's shared memory and a host-to-device copy each time. Instead the
sampling loop sends a branch's conditions once, under a key, and later steps name the key.

What `dit_step` keeps per key is the row as its decode consumes it (a `ConditionRow`): for the
PyTorch engine the transformer's cross-attention keys/values and additive mask
(`DiTStepComponent.prepare`), computed once when the conditions arrive, so a step neither
recomputes them nor compares anything; for other engines the encoder states themselves.

Semantics (the contract between the `diffusion` loop and the `dit_step` model):

- Key. One key per (request, branch): `ConditionKey(request_id, branch)`. `request_id` is unique
  per loop request (a fresh uuid4 per `diffusion` request), so two requests never share an entry,
  however equal their prompts. The key carries everything a row's conditions depend on: the
  request's LoRA adapter and its weight (AdapterChoice.key, "none" for the base model) change the
  prepared keys/values (they go through the adapted cross-attention to_k/to_v), and the task field
  is there for tasks whose conditions differ, so neither can alias an existing key.
- Wire. On top of the spec's inputs, a `dit_step` request may carry CONDITION_KEY [N, 1] (BYTES,
  one key per batch row) and CONDITION_RELEASE [N, 1] (BOOL). ENCODER_STATES / ENCODER_MASK
  become optional:
    states, no key   a direct client (perf_analyzer, tests): used as sent, nothing is stored;
    states + key     each key's row is prepared from the first row of that key and stored, unless
                     the key is held already (the loop sends every branch of a step inline when one
                     of them is new: the held ones are used as they are);
    key, no states   each row's prepared conditions are looked up; if any key is missing the request
                     fails with a TritonError whose message starts with MISS_MESSAGE (code NOT_FOUND),
                     and nothing is computed for it: the loop re-sends its conditions inline;
    neither          the request fails (INVALID_ARG).
  Rows sharing a key must carry equal conditions (the loop's rows of one branch do), and a key names
  one set of conditions for as long as it is held.
- Lifetime. A row's CONDITION_RELEASE frees its key once the request is resolved (its rows hold
  their own references to what they use). The loop sets it on a branch's rows at the last step
  that uses the branch, so a finished request holds nothing without an extra call; a loop that
  stops early (cancelled, failed) sends a release request (one row per branch still held, by key).
  An entry is also freed when a request naming it fails inside `dit_step` (e.g. out of memory), and
  as a safety net by a TTL since last use and an LRU bound on bytes. Releasing a key that is not
  held is not an error.
- Misses are never answered wrongly: another `dit_step` instance, a restarted stub or an evicted
  entry all look the same (the key is not held), and the loop answers every miss by sending the
  conditions again. With several `dit_step` instances each instance fills its own cache on its
  first miss; a release reaches only the instance that serves it, the others' entries expire by TTL.
- Identity. Every prepared row has a `serial` no other row of the process shares; a decode that
  keeps rows in its own buffers (acceleration.BucketedDecode) copies a row in only when the serial
  it holds differs, so a re-sent key (a new entry, a new serial) is always copied in afresh.
- Under dynamic batching one execute() may hold requests of all kinds; each is resolved on its own
  (`resolve_conditions`) before the rows are batched (acestep_triton.dit_step).

Torch only: unit-tested without Triton, used by acestep_triton.dit_step and the diffusion loop.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from acestep_triton.adapters import AdapterChoice
from acestep_triton.contract import NO_LORA, ParameterError
from acestep_triton.specs import CONDITION_KEY, KEYED_INPUTS

MISS_MESSAGE = "condition cache miss"

_SERIALS = itertools.count()


class ConditionMiss(LookupError):
    """A key the request names is not held by this `dit_step` instance."""

    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__(f"{MISS_MESSAGE}: {', '.join(keys)}")
        self.keys = tuple(keys)


def is_miss(message: str) -> bool:
    """Whether a `dit_step` error message reports a condition cache miss."""
    return message.startswith(MISS_MESSAGE)


@dataclass(frozen=True)
class ConditionKey:
    """What one branch row's conditions depend on; `str()` is its wire form."""

    request_id: str
    branch: str
    task: str = "text2music"
    adapter: str = NO_LORA

    def __str__(self) -> str:
        return "|".join((self.request_id, self.task, self.adapter, self.branch))


def new_request_id() -> str:
    """A request id no other loop request will ever use."""
    return uuid.uuid4().hex


@dataclass(frozen=True, eq=False)
class ConditionRow:
    """One batch row's conditions as the decode consumes them, never modified after it is made.

    `tokens` [..., S, C] has the condition tokens on its second-to-last axis and `mask` [S] one value
    per token: the prepared cross-attention keys/values [layers, 2, heads, S, head_dim] and their
    additive mask (0 valid, -inf masked) for the PyTorch engine, or the encoder states [S, D] and
    their mask (1 valid, 0 masked) for engines that take the spec's inputs. `serial` is unique in the
    process: equal serials, equal content.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    serial: int = field(default_factory=lambda: next(_SERIALS))

    @property
    def length(self) -> int:
        return self.mask.shape[-1]

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + self.mask.nbytes


def condition_rows(tokens: torch.Tensor, mask: torch.Tensor) -> list[ConditionRow]:
    """Rows [B, ..., S, C] and [B, S] -> B ConditionRows (views of them)."""
    return [ConditionRow(tokens[i], mask[i]) for i in range(tokens.shape[0])]


def stack_rows(rows: Sequence[ConditionRow], mask_fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows stacked into [B, ..., S, C] and [B, S], padded to the longest S: tokens with zeros, the mask
    with `mask_fill` (what the decode reads as an absent token: 0 for a 0/1 mask, -inf for an additive one).

    One row comes back as views of it, not copied: the lowvram profile decodes a 240 s request's rows
    one per forward, where a copy of the row's prepared keys/values (135 MiB at 577 tokens) would add
    that much to every step's peak (benchmarks/NOTES.md, "Low VRAM"). Callers only read them.
    """
    if len(rows) == 1:
        return rows[0].tokens[None], rows[0].mask[None]
    longest = max(row.length for row in rows)
    tokens = torch.stack([F.pad(row.tokens, (0, 0, 0, longest - row.length)) for row in rows])
    mask = torch.stack([F.pad(row.mask, (0, longest - row.length), value=mask_fill) for row in rows])
    return tokens, mask


# Conditions [n, L, D] and masks [n, L] of n rows, and which rows of the request they are -> their n
# ConditionRows (the request's other per-row inputs, its LoRA adapters, are read at those rows).
Prepare = Callable[[torch.Tensor, torch.Tensor, Sequence[int]], list[ConditionRow]]


@dataclass
class _Entry:
    row: ConditionRow
    last_used: float


class ConditionCache:
    """ConditionRows by key, bounded by bytes (LRU) and a TTL.

    `put` keeps a compact copy of the row (a row may be a view into a request's batch, whose memory
    would otherwise stay alive and uncounted).
    """

    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes <= 0 or ttl_s <= 0:
            raise ValueError(f"max_bytes and ttl_s must be positive, got {max_bytes}, {ttl_s}")
        self.max_bytes, self.ttl_s, self.clock = max_bytes, ttl_s, clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def put(self, key: str, row: ConditionRow) -> ConditionRow:
        """Store `row` under `key` (copied); returns the stored row."""
        self.release([key])
        stored = ConditionRow(row.tokens.clone(), row.mask.clone())
        self._entries[key] = _Entry(stored, self.clock())
        self.nbytes += stored.nbytes
        self._evict()
        return stored

    def get(self, keys: Sequence[str]) -> list[ConditionRow]:
        """The row per key, or ConditionMiss naming every missing key (nothing is touched then)."""
        self._evict()
        missing = [k for k in dict.fromkeys(keys) if k not in self._entries]
        if missing:
            raise ConditionMiss(missing)
        return [self.find(key) for key in keys]

    def find(self, key: str) -> ConditionRow | None:
        """The row held under `key` (marked used), or None."""
        self._evict()
        entry = self._entries.get(key)
        if entry is None:
            return None
        entry.last_used = self.clock()
        self._entries.move_to_end(key)
        return entry.row

    def release(self, keys: Iterable[str]) -> int:
        """Drop these keys (absent ones are skipped); returns how many were held."""
        dropped = 0
        for key in keys:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self.nbytes -= entry.row.nbytes
                dropped += 1
        return dropped

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _evict(self) -> None:
        """Entries unused for ttl_s, then the least recently used while over max_bytes."""
        deadline = self.clock() - self.ttl_s
        for key in [k for k, e in self._entries.items() if e.last_used < deadline]:
            self.release([key])
        while self.nbytes > self.max_bytes and self._entries:
            self.release([next(iter(self._entries))])


def resolve_conditions(
    cache: ConditionCache,
    inputs: Mapping[str, torch.Tensor],
    keys: Sequence[str] | None,
    prepare: Prepare,
) -> list[ConditionRow]:
    """One request's condition rows, in its row order.

    `inputs` are the request's tensors (ENCODER_* possibly absent), `keys` its CONDITION_KEY per
    row (None when it sent none). Sent conditions are prepared (only the first row of each key not
    held yet) and stored under their keys; otherwise the keys are looked up (ConditionMiss when one
    is not held).
    See the module docstring.
    """
    present = [name for name in KEYED_INPUTS if name in inputs]
    if present and len(present) != len(KEYED_INPUTS):
        raise ParameterError(present[0], f"{' and '.join(KEYED_INPUTS)} come together")
    if present:
        states, mask = inputs["ENCODER_STATES"], inputs["ENCODER_MASK"]
        if keys is None:
            return prepare(states, mask, range(states.shape[0]))
        if len(keys) != states.shape[0]:
            raise ParameterError(CONDITION_KEY, f"{len(keys)} keys for {states.shape[0]} rows")
        stored: dict[str, ConditionRow] = {}
        first_row: dict[str, int] = {}  # keys not held yet: prepared from their first row
        for row, key in enumerate(keys):
            if key in stored or key in first_row:
                continue
            held = cache.find(key)  # a key names one set of conditions: a held one is not prepared again
            if held is None:
                first_row[key] = row
            else:
                stored[key] = held
        if first_row:
            index = list(first_row.values())
            prepared = prepare(states[index], mask[index], index)
            stored.update({key: cache.put(key, row) for key, row in zip(first_row, prepared)})
        return [stored[key] for key in keys]
    if keys is None:
        raise ParameterError("ENCODER_STATES", f"missing: send {' and '.join(KEYED_INPUTS)} or {CONDITION_KEY}")
    return cache.get(keys)


def request_conditions(
    cache: ConditionCache,
    sent: Mapping[str, torch.Tensor],
    keys: Sequence[str] | None,
    release: Sequence[bool] | None,
    prepare: Prepare,
) -> list[ConditionRow]:
    """`dit_step`'s handling of one request: `resolve_conditions`, then the keys of the rows whose
    CONDITION_RELEASE is set are dropped whatever the outcome (the rows this execution needs are
    held by the returned list)."""
    try:
        return resolve_conditions(cache, sent, keys, prepare)
    finally:
        if release is not None and keys is not None:
            cache.release([key for key, flag in zip(keys, release) if flag])


def decode_keys(array: np.ndarray) -> list[str]:
    """CONDITION_KEY [N, 1] BYTES -> N key strings."""
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]


class ConditionSender:
    """The loop's side: which branches' conditions the `dit_step` instance(s) should hold.

    `step_inputs` gives the conditions part of one step's request: by key when every branch of
    the step has been sent before, else inline (with keys, so `dit_step` stores them). `sent`
    marks a step's branches once its call succeeded; `missed` forgets them all (a miss means the
    instance lost them or never had them), so the next try sends them again; `forget` drops
    released ones.
    """

    def __init__(self, request_id: str, adapter: AdapterChoice = AdapterChoice()) -> None:
        self.request_id = request_id
        self.adapter = adapter
        self._sent: dict[str, None] = {}

    def key(self, branch: str) -> str:
        return str(ConditionKey(self.request_id, branch, adapter=self.adapter.key))

    def holds(self, branches: Sequence[str]) -> bool:
        return all(b in self._sent for b in branches)

    def row_keys(self, branches: Sequence[str], items: int) -> np.ndarray:
        """CONDITION_KEY [N, 1] for rows branch-major, `items` rows per branch."""
        return np.array([self.key(b).encode() for b in branches for _ in range(items)], dtype=np.object_).reshape(-1, 1)

    def sent(self, branches: Sequence[str]) -> None:
        self._sent.update(dict.fromkeys(branches))

    def missed(self) -> None:
        self._sent.clear()

    def forget(self, branches: Sequence[str]) -> None:
        """These branches' keys were released."""
        for branch in branches:
            self._sent.pop(branch, None)

    def held(self) -> tuple[str, ...]:
        """The branches sent so far (since the last miss), in the order they were first sent."""
        return tuple(self._sent)
