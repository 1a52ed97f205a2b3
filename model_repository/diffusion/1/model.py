"""Triton python model `diffusion` (BLS): the sampling loop, one `dit_step` call per step.

Inputs: ENCODER_STATES [K, L, D] and ENCODER_MASK [K, L] (one row per guidance branch, in
acestep_triton.preprocess.BRANCHES order), SEEDS [B], DURATION [1], and the ensemble's sampling
parameters. Outputs: LATENTS [B, 8, 16, T], TIME_DIFFUSION [1, 1].
Each step's guidance branches go to `dit_step` as one batch; a failed step fails the request.
"""

import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from acestep_triton.contract import BRANCHES, ParameterError
from acestep_triton.sampling.conditions import Conditions, dit_inputs
from acestep_triton.sampling.loop import denoise
from acestep_triton.sampling.seeds import initial_noise, latent_frames, make_generators
from acestep_triton.triton_python import (
    error_response,
    input_tensors,
    model_parameters,
    request_params,
    response,
)

DIT_OUTPUT = "VELOCITY"


class Cancelled(Exception):
    pass


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.dit_model = params["DIT_MODEL"]
        if "TORCH_THREADS" in params:  # many loop instances side by side: keep each one's CPU math small
            torch.set_num_threads(int(params["TORCH_THREADS"]))

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _dit_step(self, batch):
        inputs = [pb_utils.Tensor(name, value.numpy()) for name, value in batch.items()]
        result = pb_utils.InferenceRequest(
            model_name=self.dit_model, requested_output_names=[DIT_OUTPUT], inputs=inputs
        ).exec()
        if result.has_error():
            raise RuntimeError(f"{self.dit_model}: {result.error().message()}")
        return torch.from_numpy(pb_utils.get_output_tensor_by_name(result, DIT_OUTPUT).as_numpy())

    def _one(self, request):
        start = time.perf_counter()
        try:
            tensors = input_tensors(request, ["ENCODER_STATES", "ENCODER_MASK", "SEEDS", "DURATION"])
            duration = float(tensors["DURATION"].reshape(-1)[0])
            params = request_params(request)
            states = tensors["ENCODER_STATES"]
            if not 2 <= states.shape[0] <= len(BRANCHES):
                raise ParameterError("ENCODER_STATES", f"expected 2 or 3 branch rows, got {states.shape[0]}")
            conditions = Conditions(BRANCHES[: states.shape[0]], states, tensors["ENCODER_MASK"])
            generators = make_generators(tensors["SEEDS"].tolist())
            noise = initial_noise(generators, latent_frames(duration))

            def step_fn(latents, timestep, branches):
                return self._dit_step(dit_inputs(conditions, latents, timestep, branches, params.use_erg_diffusion))

            def check_cancelled(step, total):
                if request.is_cancelled():
                    raise Cancelled(f"cancelled after step {step + 1} of {total}")

            latents = denoise(step_fn, params, noise, generators, check_cancelled)
        except Cancelled as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.CANCELLED))
        except Exception as exc:
            return error_response(exc)
        return response({
            "LATENTS": latents,
            "TIME_DIFFUSION": np.asarray([[time.perf_counter() - start]], dtype=np.float32),
        })
