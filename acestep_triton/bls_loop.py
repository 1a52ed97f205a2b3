"""The sampling loop's step function: one `dit_step` request per denoising step, conditions by key.

Triton-free (the call is injected): the `diffusion` model calls `dit_step` through BLS, the
in-process pipeline calls acestep_triton.dit_step.DitStep directly, so both send the same requests.
Semantics of the keys, misses and releases: acestep_triton.condition_cache.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from acestep_triton.adapters import AdapterChoice
from acestep_triton.condition_cache import ConditionMiss, ConditionSender, is_miss
from acestep_triton.sampling.conditions import Conditions, branch_inputs
from acestep_triton.specs import CONDITION_KEY, CONDITION_RELEASE, KEYED_INPUTS

# One dit_step request: named tensors / arrays -> VELOCITY; raises DitStepError when it answers an
# error (ConditionMiss when called in-process).
Call = Callable[[Mapping[str, torch.Tensor | np.ndarray]], torch.Tensor]


class DitStepError(RuntimeError):
    """`dit_step` answered a step with an error; `message` is its text (for the miss check)."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(f"{model}: {message}")
        self.message = message


class StepLoop:
    """One request's steps: builds each step's dit_step batch and calls it through `call`.

    Rows are branch-major (acestep_triton.sampling.loop); the branch-dependent inputs are built
    once per set of branches. With a `sender` the conditions go by key once dit_step holds them.
    """

    def __init__(self, call: Call, conditions: Conditions, use_erg_diffusion: bool, sender: ConditionSender | None,
                 plan: Sequence[Sequence[str]], adapter: AdapterChoice | None = None) -> None:
        """`plan[i]` lists the branches step i evaluates (Guidance.branches): a branch's rows carry
        CONDITION_RELEASE at the last step that uses it. With `adapter` (a dit_step that takes
        specs.ADAPTER_INPUTS) every row carries the request's LoRA adapter, "none" included: Triton
        batches only requests that carry the same inputs, so base-model and adapter requests must
        both send them to share a step."""
        self.call, self.conditions, self.use_erg_diffusion = call, conditions, use_erg_diffusion
        self.sender = sender
        self.adapter = adapter
        self.last_use = {branch: i for i, branches in enumerate(plan) for branch in branches}
        self.per_branches: dict[tuple[str, ...], dict] = {}
        self.calls = 0
        self.last: tuple[torch.Tensor, tuple[str, ...]] | None = None

    def _branch_inputs(self, branches: tuple[str, ...], items: int, frames: int) -> dict:
        if branches not in self.per_branches:
            self.per_branches[branches] = branch_inputs(self.conditions, branches, items, frames,
                                                        self.use_erg_diffusion)
        return self.per_branches[branches]

    def _adapter_arrays(self, rows: int) -> dict[str, np.ndarray]:
        return self.adapter.arrays(rows) if self.adapter is not None else {}

    def step(self, latents: torch.Tensor, timestep: torch.Tensor, branches) -> torch.Tensor:
        branches = tuple(branches)
        items = latents.shape[0] // len(branches)
        self.last = (latents, branches)
        self.calls += 1
        base = {"LATENTS": latents, "TIMESTEP": timestep.reshape(-1, 1),
                **self._branch_inputs(branches, items, latents.shape[-1]), **self._adapter_arrays(latents.shape[0])}
        if self.sender is None:
            return self.call(base)
        done = tuple(b for b in branches if self.last_use[b] == self.calls - 1)
        extra = {CONDITION_KEY: self.sender.row_keys(branches, items)}
        if done:
            extra[CONDITION_RELEASE] = np.array([b in done for b in branches for _ in range(items)]).reshape(-1, 1)
        velocity = None
        if self.sender.holds(branches):
            try:
                velocity = self.call({**{k: v for k, v in base.items() if k not in KEYED_INPUTS}, **extra})
            except (DitStepError, ConditionMiss) as exc:
                if isinstance(exc, DitStepError) and not is_miss(exc.message):
                    raise
                self.sender.missed()
        if velocity is None:
            velocity = self.call({**base, **extra})
            self.sender.sent(branches)
        self.sender.forget(done)
        return velocity

    def release(self) -> None:
        """Free the conditions dit_step still holds for a loop that stopped early: one row per held
        branch, by key, with CONDITION_RELEASE. The result and errors are ignored (a miss means
        nothing was left to free)."""
        if self.sender is None or self.last is None or not self.sender.held():
            return
        latents, _ = self.last
        held = self.sender.held()
        rows = branch_inputs(self.conditions, held, 1, latents.shape[-1], self.use_erg_diffusion)
        batch = {"LATENTS": latents[:1].repeat(len(held), 1, 1, 1),
                 "TIMESTEP": torch.zeros(len(held), 1, device=latents.device),
                 **{k: v for k, v in rows.items() if k not in KEYED_INPUTS}, **self._adapter_arrays(len(held)),
                 CONDITION_KEY: self.sender.row_keys(held, 1),
                 CONDITION_RELEASE: np.ones((len(held), 1), dtype=bool)}
        try:
            self.call(batch)
        except (DitStepError, ConditionMiss):
            pass
        self.sender.missed()
