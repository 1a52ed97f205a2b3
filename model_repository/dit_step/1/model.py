"""Triton python model `dit_step`: one transformer decode per row, with the per-request condition cache.

Inputs: the dit_step spec (acestep_triton.specs: LATENTS [N, 8, 16, T], ATTENTION_MASK [N, T],
ENCODER_STATES [N, L, D], ENCODER_MASK [N, L], TIMESTEP [N, 1], Q_SCALE [N, 1]), where
ENCODER_STATES / ENCODER_MASK are optional when CONDITION_KEY [N, 1] names cached rows, and
CONDITION_RELEASE [N, 1] frees the request's keys, and the optional ADAPTER / ADAPTER_WEIGHT [N, 1]
(where the profile serves LoRA adapters) name each row's adapter. Outputs: VELOCITY [N, 8, 16, T],
TIME_DIT_STEP [N, 1]. The request handling (cache, prepared conditions, adapters, bounded sub-batches)
is acestep_triton.dit_step.DitStep; the cache's semantics are in acestep_triton.condition_cache.
"""

from acestep_triton.condition_cache import ConditionCache
from acestep_triton.dit_step import DitStep
from acestep_triton.specs import ADAPTER_INPUTS, CONDITION_INPUTS
from acestep_triton.triton_python import ComponentModel, input_array, input_tensor, model_parameters


class TritonPythonModel(ComponentModel):
    component = "dit_step"

    def initialize(self, args):
        super().initialize(args)
        params = model_parameters(args)
        cache = ConditionCache(int(params["CONDITION_CACHE_MIB"]) * 2**20, float(params["CONDITION_CACHE_TTL_S"]))
        self.step = DitStep(self.engine, cache, self.max_row_frames, self.phases)

    def request_inputs(self, request) -> dict:
        """The request as DitStep takes it: the numeric inputs it sent as tensors where they arrived,
        its keys, release flags and adapters as numpy."""
        inputs = {t.name: input_tensor(request, t.name) for t in self.spec.inputs}
        inputs.update({t.name: input_array(request, t.name) for t in (*CONDITION_INPUTS, *ADAPTER_INPUTS)})
        return {name: value for name, value in inputs.items() if value is not None}

    def run(self, inputs):
        return self.step.execute(inputs)

    def finalize(self):
        self.step.cache.clear()
