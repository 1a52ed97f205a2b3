"""Triton python model `diffusion` (BLS): the sampling loop, one `dit_step` call per step.

Inputs: ENCODER_STATES [K, L, D] and ENCODER_MASK [K, L] (one row per guidance branch, in
acestep_triton.preprocess.BRANCHES order), SEEDS [B], DURATION [1], and the ensemble's sampling
parameters. Outputs: LATENTS [B, 8, 16, T], TIME_DIFFUSION [1, 1].

Each step's guidance branches go to `dit_step` as one batch. With CONDITION_CACHE=1 a branch's
conditions cross into `dit_step` once (acestep_triton.condition_cache): later steps send only
the keys, a miss is answered by sending them again, the last step releases them, and a cancelled
or failed loop sends a one-row release. A failed step fails the request.

LOOP_DEVICE says where the loop's tensors live (the gpu profile's choice, see
export.build_repository.Profile.loop_device): "cpu" keeps the loop off the GPU (no CUDA context per
loop instance; each step sends its latents and gets the velocity back through host memory), "cuda"
keeps latents, conditions and the scheduler math on the GPU and hands them to `dit_step` as CUDA
tensors (DLPack both ways, BLS outputs asked for in GPU memory). A CUDA tensor sent through BLS is
exported with CUDA IPC, which memory from PyTorch's expandable segments does not support, so a
cuda loop sets its own allocator to CUDA_ALLOC_CONF (expandable_segments:False) before its first
CUDA allocation; the loop allocates little, so this costs no memory worth counting.
"""

import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from acestep_triton.condition_cache import (
    CONDITION_KEY,
    CONDITION_RELEASE,
    KEYED_INPUTS,
    ConditionSender,
    is_miss,
    new_request_id,
)
from acestep_triton.contract import ParameterError
from acestep_triton.pipeline import Conditions, branch_inputs
from acestep_triton.preprocess import BRANCHES
from acestep_triton.sampling.loop import denoise
from acestep_triton.sampling.schedulers import flow_match_schedule
from acestep_triton.sampling.seeds import initial_noise, latent_frames, make_generators
from acestep_triton.triton_python import (
    error_response,
    handoff,
    input_tensors,
    model_parameters,
    request_params,
    response,
)

DIT_OUTPUT = "VELOCITY"


class Cancelled(Exception):
    pass


class DitStepError(RuntimeError):
    """`dit_step` answered a step with an error; `message` is its text (for the miss check)."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(f"{model}: {message}")
        self.message = message


class _Loop:
    """One request's steps: builds each step's dit_step batch and calls it through `call`.

    Rows are branch-major (acestep_triton.sampling.loop); the branch-dependent inputs are built
    once per set of branches. With a `sender` the conditions go by key once dit_step holds them.
    """

    def __init__(self, call, conditions: Conditions, use_erg_diffusion: bool, sender: ConditionSender | None,
                 total_steps: int) -> None:
        self.call, self.conditions, self.use_erg_diffusion = call, conditions, use_erg_diffusion
        self.sender, self.total_steps = sender, total_steps
        self.per_branches: dict[tuple[str, ...], dict] = {}
        self.calls = 0
        self.released = False
        self.last: tuple[torch.Tensor, tuple[str, ...]] | None = None

    def _branch_inputs(self, branches: tuple[str, ...], items: int, frames: int) -> dict:
        if branches not in self.per_branches:
            self.per_branches[branches] = branch_inputs(self.conditions, branches, items, frames,
                                                        self.use_erg_diffusion)
        return self.per_branches[branches]

    def step(self, latents: torch.Tensor, timestep: torch.Tensor, branches) -> torch.Tensor:
        branches = tuple(branches)
        items = latents.shape[0] // len(branches)
        self.last = (latents, branches)
        self.calls += 1
        base = {"LATENTS": latents, "TIMESTEP": timestep.reshape(-1, 1),
                **self._branch_inputs(branches, items, latents.shape[-1])}
        if self.sender is None:
            return self.call(base)
        extra = {CONDITION_KEY: self.sender.row_keys(branches, items)}
        if self.calls == self.total_steps:
            extra[CONDITION_RELEASE] = np.ones((latents.shape[0], 1), dtype=bool)
            self.released = True
        if self.sender.holds(branches):
            try:
                return self.call({**{k: v for k, v in base.items() if k not in KEYED_INPUTS}, **extra})
            except DitStepError as exc:
                if not is_miss(exc.message):
                    raise
                self.sender.missed()
        velocity = self.call({**base, **extra})
        self.sender.sent(branches)
        return velocity

    def release(self) -> None:
        """Free a stopped loop's conditions in dit_step: one row by key with CONDITION_RELEASE. Its
        result and errors are ignored (a miss means there was nothing left to free)."""
        if self.sender is None or self.released or self.last is None or not self.sender.all_keys():
            return
        latents, branches = self.last
        first = {k: v[:1] for k, v in self.per_branches[branches].items() if k not in KEYED_INPUTS}
        batch = {"LATENTS": latents[:1], "TIMESTEP": torch.zeros(1, 1, device=latents.device), **first,
                 CONDITION_KEY: self.sender.row_keys(branches[:1], 1),
                 CONDITION_RELEASE: np.ones((1, 1), dtype=bool)}
        try:
            self.call(batch)
        except DitStepError:
            pass
        self.released = True


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.dit_model = params["DIT_MODEL"]
        self.use_cache = params["CONDITION_CACHE"] == "1"
        if "TORCH_THREADS" in params:  # many loop instances side by side: keep each one's CPU math small
            torch.set_num_threads(int(params["TORCH_THREADS"]))
        self.device = torch.device(params["LOOP_DEVICE"])
        self.preferred_memory = None
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
            # before this process's first CUDA allocation (see the module docstring)
            torch._C._accelerator_setAllocatorSettings(params["CUDA_ALLOC_CONF"])
            torch.cuda.set_device(self.device)
            self.preferred_memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, self.device.index)

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _call(self, batch) -> torch.Tensor:
        """One BLS call to dit_step: its VELOCITY on the loop's device, or DitStepError."""
        options = {} if self.preferred_memory is None else {"preferred_memory": self.preferred_memory}
        result = pb_utils.InferenceRequest(
            model_name=self.dit_model, requested_output_names=[DIT_OUTPUT], inputs=handoff(batch), **options
        ).exec()
        if result.has_error():
            raise DitStepError(self.dit_model, result.error().message())
        velocity = pb_utils.get_output_tensor_by_name(result, DIT_OUTPUT)
        return torch.from_dlpack(velocity.to_dlpack()).to(self.device)

    def _one(self, request):
        start = time.perf_counter()
        loop = None
        try:
            tensors = input_tensors(request, ["ENCODER_STATES", "ENCODER_MASK", "SEEDS", "DURATION"])
            duration = float(tensors["DURATION"].reshape(-1)[0])
            params = request_params(request)
            states = tensors["ENCODER_STATES"].to(self.device)
            if not 2 <= states.shape[0] <= len(BRANCHES):
                raise ParameterError("ENCODER_STATES", f"expected 2 or 3 branch rows, got {states.shape[0]}")
            conditions = Conditions(BRANCHES[: states.shape[0]], states, tensors["ENCODER_MASK"].to(self.device))
            generators = make_generators(tensors["SEEDS"].cpu().tolist())
            noise = initial_noise(generators, latent_frames(duration), device=self.device)
            sender = ConditionSender(new_request_id()) if self.use_cache else None
            total = len(flow_match_schedule(params.scheduler_type, params.infer_step, params.oss_steps).timesteps)
            loop = _Loop(self._call, conditions, params.use_erg_diffusion, sender, total)

            def check_cancelled(step, total):
                if request.is_cancelled():
                    raise Cancelled(f"cancelled after step {step + 1} of {total}")

            latents = denoise(loop.step, params, noise, generators, check_cancelled)
        except Exception as exc:
            if loop is not None:
                loop.release()
            if isinstance(exc, Cancelled):
                return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.CANCELLED))
            return error_response(exc)
        return response({
            "LATENTS": latents,
            "TIME_DIFFUSION": np.asarray([[time.perf_counter() - start]], dtype=np.float32),
        })
