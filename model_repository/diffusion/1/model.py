"""Triton python model `diffusion` (BLS): every task's sampling loop, one `dit_step` call per step.

Inputs: ENCODER_STATES [K, L, D] and ENCODER_MASK [K, L] (one row per condition branch,
acestep_triton.contract.condition_branches), ADAPTER / ADAPTER_WEIGHT [K, 1] (the request's LoRA
adapter, sent on with every step's rows where dit_step takes them: SEND_ADAPTERS=1), SEEDS [B],
RETAKE_SEEDS_USED [B], DURATION [1], the ensemble's sampling and task parameters, and the optional
SRC_AUDIO [C, N] / SRC_SAMPLE_RATE [1] of the tasks that start from audio, which it encodes by a BLS
call to `dcae_encoder`.
Outputs: LATENTS [B, 8, 16, T], TIME_DIFFUSION [1, 1]. The loop itself is
acestep_triton.sampling.tasks.generate, the in-process pipeline's.

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
from acestep_triton.contract import GenerationParams, ParameterError, condition_branches
from acestep_triton.geometry import PUBLISHED_GEOMETRY
from acestep_triton.models.dcae import encoder_audio
from acestep_triton.sampling.conditions import Conditions
from acestep_triton.sampling.seeds import make_generators
from acestep_triton.sampling.tasks import call_plan, check_source, generate
from acestep_triton.specs import ADAPTER, ADAPTER_WEIGHT
from acestep_triton.triton_python import (
    PhaseLog,
    error_response,
    handoff,
    input_array,
    input_tensors,
    model_parameters,
    request_params,
    request_source,
    response,
)

# The model each step calls (its registry name) and the output it reads (the dit_step spec's);
# the same for the source audio's encoder.
DIT_MODEL = "dit_step"
DIT_OUTPUT = "VELOCITY"
ENCODER_MODEL = "dcae_encoder"
ENCODER_OUTPUT = "LATENTS"


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
        self.phases = PhaseLog("diffusion")
        self.preferred_memory = None
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
            # before this process's first CUDA allocation (see the module docstring)
            torch.cuda.memory._set_allocator_settings(params["CUDA_ALLOC_CONF"])
            torch.cuda.set_device(self.device)
            self.preferred_memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, self.device.index)
        self._warm_up()

    def _warm_up(self) -> None:
        """The loop's own work once (contract defaults, a stand-in step), so that an instance's first
        request does not pay for what the scheduler and guidance load or build on first use."""
        params = GenerationParams(prompt="", lyrics="", audio_duration=1.0, actual_seeds=(0,))
        generate(lambda latents, timestep, branches: torch.zeros_like(latents), params, make_generators([0]),
                 make_generators([0]), params.audio_duration, device=self.device)

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _call(self, batch) -> torch.Tensor:
        """One BLS call to dit_step: its VELOCITY on the loop's device, or DitStepError.

        Phases (PhaseLog, one line per step): loop (since the previous step's call returned: the
        scheduler, guidance and this step's inputs), send, bls (the call's round trip), receive."""
        self.phases.mark("loop")
        options = {} if self.preferred_memory is None else {"preferred_memory": self.preferred_memory}
        inputs = handoff(batch)
        self.phases.mark("send")
        result = pb_utils.InferenceRequest(
            model_name=DIT_MODEL, requested_output_names=[DIT_OUTPUT], inputs=inputs, **options
        ).exec()
        self.phases.mark("bls")
        if result.has_error():
            self.phases.write(error=True)
            raise DitStepError(DIT_MODEL, result.error().message())
        velocity = pb_utils.get_output_tensor_by_name(result, DIT_OUTPUT)
        velocity = torch.from_dlpack(velocity.to_dlpack()).to(self.device)
        self.phases.mark("receive")
        self.phases.write(rows=int(velocity.shape[0]), inline="ENCODER_STATES" in batch)
        return velocity

    def after_step(self, request, step: int, total: int) -> None:
        """Runs after each step (0-based `step` of `total`): stops a cancelled request. `acestep_stream`
        extends it to report the step."""
        if request.is_cancelled():
            raise Cancelled(f"cancelled after step {step + 1} of {total}")

    def _encode(self, source) -> torch.Tensor:
        """Source audio -> its latents [1, 8, 16, T] on the loop's device, by a BLS call to dcae_encoder."""
        samples = torch.from_numpy(source.samples)
        audio = encoder_audio(samples, source.sample_rate, PUBLISHED_GEOMETRY.sample_rate,
                              PUBLISHED_GEOMETRY.audio_channels).to(self.device)
        options = {} if self.preferred_memory is None else {"preferred_memory": self.preferred_memory}
        result = pb_utils.InferenceRequest(
            model_name=ENCODER_MODEL, requested_output_names=[ENCODER_OUTPUT], inputs=handoff({"AUDIO": audio}),
            **options,
        ).exec()
        if result.has_error():
            raise DitStepError(ENCODER_MODEL, result.error().message())
        latents = pb_utils.get_output_tensor_by_name(result, ENCODER_OUTPUT)
        return torch.from_dlpack(latents.to_dlpack()).to(self.device)

    def _one(self, request):
        start = time.perf_counter()
        self.phases.start()
        loop = None
        try:
            tensors = input_tensors(request, ["ENCODER_STATES", "ENCODER_MASK", "SEEDS", "RETAKE_SEEDS_USED",
                                              "DURATION"])
            duration = float(tensors["DURATION"].reshape(-1)[0])
            params = request_params(request)
            branches = condition_branches(params)
            states = tensors["ENCODER_STATES"].to(self.device)
            if states.shape[0] != len(branches):
                raise ParameterError("ENCODER_STATES", f"expected {len(branches)} condition rows for this request "
                                                       f"({', '.join(branches)}), got {states.shape[0]}")
            conditions = Conditions(branches, states, tensors["ENCODER_MASK"].to(self.device))
            source = request_source(request)
            frames = check_source(params, source)
            source_latents = self._encode(source) if source is not None else None
            adapter = AdapterChoice.from_arrays(input_array(request, ADAPTER), input_array(request, ADAPTER_WEIGHT))
            sender = ConditionSender(new_request_id(), adapter) if self.use_cache else None
            loop = StepLoop(self._call, conditions, params.use_erg_diffusion, sender, call_plan(params, frames),
                            adapter if self.send_adapters else None)
            latents = generate(loop.step, params, make_generators(tensors["SEEDS"].cpu().tolist()),
                               make_generators(tensors["RETAKE_SEEDS_USED"].cpu().tolist()), duration, source_latents,
                               lambda i, total: self.after_step(request, i, total), self.device)
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
