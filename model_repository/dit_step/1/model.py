"""Triton python model `dit_step`: one transformer decode per row, with the per-request condition cache.

Inputs: the dit_step spec (acestep_triton.specs: LATENTS [N, 8, 16, T], ATTENTION_MASK [N, T],
ENCODER_STATES [N, L, D], ENCODER_MASK [N, L], TIMESTEP [N, 1], Q_SCALE [N, 1]), where
ENCODER_STATES / ENCODER_MASK are optional when CONDITION_KEY [N, 1] names cached rows, and
CONDITION_RELEASE [N, 1] frees the request's keys. Outputs: VELOCITY [N, 8, 16, T], TIME_DIT_STEP [N, 1].
The cache's semantics are in acestep_triton.condition_cache; batching and bounds in
acestep_triton.triton_python.ComponentModel.
"""

import torch

from acestep_triton.condition_cache import ConditionCache, decode_keys, request_conditions
from acestep_triton.specs import CONDITION_KEY, CONDITION_RELEASE, KEYED_INPUTS
from acestep_triton.triton_python import ComponentModel, input_array, input_tensor, input_tensors, model_parameters


class TritonPythonModel(ComponentModel):
    component = "dit_step"

    def initialize(self, args):
        super().initialize(args)
        params = model_parameters(args)
        self.cache = ConditionCache(int(params["CONDITION_CACHE_MIB"]) * 2**20, float(params["CONDITION_CACHE_TTL_S"]))

    @staticmethod
    def _keys(request) -> list[str] | None:
        array = input_array(request, CONDITION_KEY)
        return None if array is None else decode_keys(array)

    def request_inputs(self, request) -> dict[str, torch.Tensor]:
        """Spec inputs on the device; the conditions inline or from the cache (released here when flagged)."""
        names = [t.name for t in self.spec.inputs if t.name not in KEYED_INPUTS]
        inputs = {name: value.to(self.device) for name, value in input_tensors(request, names).items()}
        sent = {name: input_tensor(request, name) for name in KEYED_INPUTS}
        keys = self._keys(request)
        release = input_array(request, CONDITION_RELEASE)
        inputs.update(request_conditions(self.cache, {k: v for k, v in sent.items() if v is not None}, keys,
                                         None if release is None else release.reshape(-1).tolist(),
                                         self.device, self.dtype))
        return inputs

    def request_failed(self, request, exc: Exception) -> None:
        """A request that failed here (e.g. out of memory) frees its conditions: the loop gives up on it."""
        keys = self._keys(request)
        if keys is not None:
            self.cache.release(keys)

    def finalize(self):
        self.cache.clear()
