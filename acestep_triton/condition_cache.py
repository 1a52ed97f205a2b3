"""Conditions cross into `dit_step` once per request: a per-request condition cache in the model.

A request's encoder states (ENCODER_STATES [K, L, D], ENCODER_MASK [K, L], one row per guidance
branch) are the same at every denoising step, and they are by far the largest input of a step
(at 60 s, ~9 MB in float32 against ~0.5 MB of latents per row). Sending them with every step costs
a copy through the python backend's shared memory and a host-to-device copy each time. Instead the
sampling loop sends a branch's conditions once, under a key, and later steps name the key.

Semantics (the contract between the `diffusion` loop and the `dit_step` model):

- Key. One key per (request, branch): `ConditionKey(request_id, branch)`. `request_id` is unique
  per loop request (a fresh uuid4 per `diffusion` request), so two requests never share an entry,
  however equal their prompts. The key carries everything a row's conditions depend on: the
  request's LoRA adapter (its name, or "none") changes them, and the task field is there for the
  tasks to come, so neither can alias an existing key.
- Wire. On top of the spec's inputs, a `dit_step` request may carry CONDITION_KEY [N, 1] (BYTES,
  one key per batch row) and CONDITION_RELEASE [N, 1] (BOOL). ENCODER_STATES / ENCODER_MASK
  become optional:
    states, no key   a direct client (perf_analyzer, tests): used as sent, nothing is stored;
    states + key     used as sent, and each key's row is stored (the first row of each key);
    key, no states   each row's conditions are looked up; if any key is missing the request fails
                     with a TritonError whose message starts with MISS_MESSAGE (code NOT_FOUND),
                     and nothing is computed for it: the loop re-sends its conditions inline;
    neither          the request fails (INVALID_ARG).
  Rows sharing a key must carry equal conditions (the loop's rows of one branch do).
- Lifetime. A row's CONDITION_RELEASE frees its key once the request is resolved (its rows are
  computed from copies). The loop sets it on a branch's rows at the last step that uses the branch,
  so a finished request holds nothing without an extra call; a loop that stops early (cancelled,
  failed) sends a release request (one row per branch still held, by key). An entry is also freed
  when a request naming it fails inside `dit_step` (e.g. out of memory), and as a safety net by a
  TTL since last use and an LRU bound on bytes. Releasing a key that is not held is not an error.
- Misses are never answered wrongly: another `dit_step` instance, a restarted stub or an evicted
  entry all look the same (the key is not held), and the loop answers every miss by sending the
  conditions again. With several `dit_step` instances each instance fills its own cache on its
  first miss; a release reaches only the instance that serves it, the others' entries expire by TTL.
- Under dynamic batching one execute() may hold requests of all kinds; each is resolved on its own
  (`resolve_conditions`) before the rows are batched.

Torch only: unit-tested without Triton, used by model_repository/diffusion and dit_step.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from acestep_triton.contract import NO_LORA, ParameterError
from acestep_triton.specs import CONDITION_KEY, KEYED_INPUTS

MISS_MESSAGE = "condition cache miss"


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


@dataclass
class _Entry:
    states: torch.Tensor  # [L, D]
    mask: torch.Tensor  # [L]
    last_used: float

    @property
    def nbytes(self) -> int:
        return self.states.nbytes + self.mask.nbytes


class ConditionCache:
    """Condition rows by key, on the model's device and dtype, bounded by bytes (LRU) and a TTL.

    `put` copies: the python backend frees a request's input tensors when execute() returns.
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

    def put(self, key: str, states: torch.Tensor, mask: torch.Tensor) -> None:
        """Store one row: states [L, D], mask [L] (copied)."""
        self.release([key])
        entry = _Entry(states.clone(), mask.clone(), self.clock())
        self._entries[key] = entry
        self.nbytes += entry.nbytes
        self._evict()

    def get(self, keys: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(states, mask) per key, or ConditionMiss naming every missing key (nothing is touched then)."""
        self._evict()
        missing = [k for k in dict.fromkeys(keys) if k not in self._entries]
        if missing:
            raise ConditionMiss(missing)
        now = self.clock()
        rows = []
        for key in keys:
            entry = self._entries[key]
            entry.last_used = now
            self._entries.move_to_end(key)
            rows.append((entry.states, entry.mask))
        return rows

    def release(self, keys: Iterable[str]) -> int:
        """Drop these keys (absent ones are skipped); returns how many were held."""
        dropped = 0
        for key in keys:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self.nbytes -= entry.nbytes
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


def _pad_tokens(rows: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack rows of (states [L, D], mask [L]) padded to the longest L (padding masked out)."""
    longest = max(states.shape[0] for states, _ in rows)
    states = torch.stack([F.pad(s, (0, 0, 0, longest - s.shape[0])) for s, _ in rows])
    mask = torch.stack([F.pad(m, (0, longest - m.shape[0])) for _, m in rows])
    return states, mask


def resolve_conditions(
    cache: ConditionCache,
    inputs: Mapping[str, torch.Tensor],
    keys: Sequence[str] | None,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """One request's ENCODER_STATES / ENCODER_MASK rows on `device`, floating ones in `dtype`.

    `inputs` are the request's tensors (ENCODER_* possibly absent), `keys` its CONDITION_KEY per
    row (None when it sent none). Sent conditions are stored under their keys; otherwise they
    are looked up (ConditionMiss when a key is not held). See the module docstring.
    """
    present = [name for name in KEYED_INPUTS if name in inputs]
    if present and len(present) != len(KEYED_INPUTS):
        raise ParameterError(present[0], f"{' and '.join(KEYED_INPUTS)} come together")
    if present:
        states = inputs["ENCODER_STATES"].to(device, dtype)
        mask = inputs["ENCODER_MASK"].to(device, dtype)
        if keys is not None:
            if len(keys) != states.shape[0]:
                raise ParameterError(CONDITION_KEY, f"{len(keys)} keys for {states.shape[0]} rows")
            first_row: dict[str, int] = {}
            for row, key in enumerate(keys):
                first_row.setdefault(key, row)
            for key, row in first_row.items():
                cache.put(key, states[row], mask[row])
        return {"ENCODER_STATES": states, "ENCODER_MASK": mask}
    if keys is None:
        raise ParameterError("ENCODER_STATES", f"missing: send {' and '.join(KEYED_INPUTS)} or {CONDITION_KEY}")
    states, mask = _pad_tokens(cache.get(keys))
    return {"ENCODER_STATES": states.to(device, dtype), "ENCODER_MASK": mask.to(device, dtype)}


def request_conditions(
    cache: ConditionCache,
    sent: Mapping[str, torch.Tensor],
    keys: Sequence[str] | None,
    release: Sequence[bool] | None,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """`dit_step`'s handling of one request: `resolve_conditions`, then the keys of the rows whose
    CONDITION_RELEASE is set are dropped whatever the outcome (the rows this execution needs were
    copied out of the cache already)."""
    try:
        return resolve_conditions(cache, sent, keys, device, dtype)
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

    def __init__(self, request_id: str, adapter: str = NO_LORA) -> None:
        self.request_id = request_id
        self.adapter = adapter
        self._sent: dict[str, None] = {}

    def key(self, branch: str) -> str:
        return str(ConditionKey(self.request_id, branch, adapter=self.adapter))

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
