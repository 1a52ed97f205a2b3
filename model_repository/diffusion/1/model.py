"""Triton python model `diffusion` (BLS): the sampling loop, one `dit_step` call per step.

Inputs: ENCODER_STATES [K, L, D] and ENCODER_MASK [K, L] (one row per guidance branch, in
acestep_triton.contract.BRANCHES order), ADAPTER / ADAPTER_WEIGHT [K, 1] (the request's LoRA adapter,
sent on with every step's rows where dit_step takes them: SEND_ADAPTERS=1), SEEDS [B], DURATION [1], and
the ensemble's sampling parameters. Outputs: LATENTS [B, 8, 16, T], TIME_DIFFUSION [1, 1].

Each step's guidance branches go to `dit_step` as one batch. With CONDITION_CACHE=1 a branch's
conditions cross into `dit_step` once (acestep_triton.condition_cache): later steps send only
the keys, a miss is answered by sending them again, a branch's last step releases it, and a
cancelled or failed loop sends a release. A failed step fails the request.

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

from acestep_triton.adapters import AdapterChoice
from acestep_triton.bls_loop import DitStepError, StepLoop
from acestep_triton.condition_cache import ConditionSender, new_request_id
from acestep_triton.contract import BRANCHES, ParameterError
from acestep_triton.sampling.conditions import Conditions
from acestep_triton.sampling.guidance import Guidance
from acestep_triton.sampling.loop import denoise
from acestep_triton.sampling.schedulers import flow_match_schedule
from acestep_triton.sampling.seeds import initial_noise, latent_frames, make_generators
from acestep_triton.specs import ADAPTER, ADAPTER_WEIGHT
from acestep_triton.triton_python import (
    error_response,
    handoff,
    input_array,
    input_tensors,
    model_parameters,
    request_params,
    response,
)

# The model each step calls (its registry name) and the output it reads (the dit_step spec's).
DIT_MODEL = "dit_step"
DIT_OUTPUT = "VELOCITY"


class Cancelled(Exception):
    pass


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.use_cache = params["CONDITION_CACHE"] == "1"
        self.send_adapters = params["SEND_ADAPTERS"] == "1"
        if "TORCH_THREADS" in params:  # many loop instances side by side: keep each one's CPU math small
            torch.set_num_threads(int(params["TORCH_THREADS"]))
        self.device = torch.device(params["LOOP_DEVICE"])
        self.preferred_memory = None
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
            # before this process's first CUDA allocation (see the module docstring)
            torch.cuda.memory._set_allocator_settings(params["CUDA_ALLOC_CONF"])
            torch.cuda.set_device(self.device)
            self.preferred_memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, self.device.index)

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _call(self, batch) -> torch.Tensor:
        """One BLS call to dit_step: its VELOCITY on the loop's device, or DitStepError."""
        options = {} if self.preferred_memory is None else {"preferred_memory": self.preferred_memory}
        result = pb_utils.InferenceRequest(
            model_name=DIT_MODEL, requested_output_names=[DIT_OUTPUT], inputs=handoff(batch), **options
        ).exec()
        if result.has_error():
            raise DitStepError(DIT_MODEL, result.error().message())
        velocity = pb_utils.get_output_tensor_by_name(result, DIT_OUTPUT)
        return torch.from_dlpack(velocity.to_dlpack()).to(self.device)

    def after_step(self, request, step: int, total: int) -> None:
        """Runs after each step (0-based `step` of `total`): stops a cancelled request. `acestep_stream`
        extends it to report the step."""
        if request.is_cancelled():
            raise Cancelled(f"cancelled after step {step + 1} of {total}")

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
            adapter = AdapterChoice.from_arrays(input_array(request, ADAPTER), input_array(request, ADAPTER_WEIGHT))
            sender = ConditionSender(new_request_id(), adapter.name) if self.use_cache else None
            schedule = flow_match_schedule(params.scheduler_type, params.infer_step, params.oss_steps)
            guidance = Guidance(params, schedule.num_inference_steps)
            plan = [guidance.branches(i) for i in range(len(schedule.timesteps))]
            loop = StepLoop(self._call, conditions, params.use_erg_diffusion, sender, plan,
                            adapter if self.send_adapters else None)

            latents = denoise(loop.step, params, noise, generators, lambda i, total: self.after_step(request, i, total))
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
