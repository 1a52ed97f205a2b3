"""Triton python model `acestep_stream` (decoupled): the `acestep` ensemble's stages, reporting progress.

Inputs: the ensemble's (acestep_triton.contract.ENSEMBLE_INPUTS). Responses: one per stage start
and one after every diffusion step, each with STAGE [1] (string), STEP [1] (steps done, never
decreasing) and STEPS [1] (int32);
then the last, flagged final, with the ensemble's outputs (WAVEFORM [items, 2, samples], SEEDS,
DURATION, TIME_<STAGE>) or an error.

preprocess, text_encoder, condition_encoder, dcae_decoder and vocoder are called by BLS, in the
ensemble's order and with its tensor names (the STAGES parameter, written by
export.build_repository from the same specs). The sampling loop runs here, as the `diffusion`
model's own class (imported from its model.py next to this model, not copied), with its
`after_step` extended to send each step and to stop when the client cancelled: the gRPC stream's
cancellation reaches this request directly, which a loop inside the ensemble does not see until
the ensemble's next step.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from acestep_triton.contract import ENSEMBLE_OUTPUTS
from acestep_triton.triton_python import error_response, model_parameters

_DIFFUSION_SOURCE = Path(__file__).resolve().parents[2] / "diffusion" / "1" / "model.py"
_spec = importlib.util.spec_from_file_location("acestep_diffusion_model", _DIFFUSION_SOURCE)
diffusion = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diffusion)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class StageFailed(Exception):
    """A stage answered an error; `error` is its TritonError, passed on as it is."""

    def __init__(self, error) -> None:
        super().__init__(error.message())
        self.error = error


class _LoopRequest:
    """The loop's view of a stream request: its inputs gathered from the earlier stages, its
    cancellation and its response sender those of the stream request."""

    def __init__(self, tensors: dict, sender) -> None:
        self._tensors = tensors
        self.sender = sender

    def inputs(self) -> list:
        return list(self._tensors.values())

    def is_cancelled(self) -> bool:
        return self.sender.is_cancelled()


def progress_response(stage: str, step: int, steps: int):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("STAGE", np.array([stage.encode()], dtype=np.object_)),
        pb_utils.Tensor("STEP", np.array([step], dtype=np.int32)),
        pb_utils.Tensor("STEPS", np.array([steps], dtype=np.int32)),
    ])


class TritonPythonModel(diffusion.TritonPythonModel):
    def initialize(self, args):
        super().initialize(args)
        params = model_parameters(args)
        self.stages = json.loads(params["STAGES"])
        self.loop_stage = params["LOOP_STAGE"]
        self.outputs = [t.name for t in ENSEMBLE_OUTPUTS]

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                outputs = self._run(request, sender)
            except diffusion.Cancelled as exc:
                sender.send(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(exc), pb_utils.TritonError.CANCELLED)), flags=FINAL)
            except StageFailed as exc:
                sender.send(pb_utils.InferenceResponse(error=exc.error), flags=FINAL)
            except Exception as exc:
                sender.send(error_response(exc), flags=FINAL)
            else:
                sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL)
        return None

    def after_step(self, request, step: int, total: int) -> None:
        super().after_step(request, step, total)
        request.sender.send(progress_response(self.loop_stage, step + 1, total))

    def _run(self, request, sender) -> list:
        """Every stage in order; the ensemble's outputs (pb_utils.Tensors)."""
        tensors = {t.name(): t for t in request.inputs()}
        steps = int(tensors["INFER_STEP"].as_numpy().reshape(-1)[0])
        oss = tensors["OSS_STEPS"].as_numpy().reshape(-1)
        steps = len(oss) if oss.size else steps
        done = 0  # steps done: 0 before the loop, all of them after it
        for stage in self.stages:
            if sender.is_cancelled():
                raise diffusion.Cancelled(f"cancelled before {stage['model']}")
            sender.send(progress_response(stage["model"], done, steps))
            inputs = {name: tensors[name] for name in stage["inputs"] if name in tensors}  # optional ones may be absent
            if stage["model"] == self.loop_stage:
                answer = self._one(_LoopRequest(inputs, sender))
                done = steps
            else:
                answer = pb_utils.InferenceRequest(
                    model_name=stage["model"], requested_output_names=stage["outputs"], inputs=list(inputs.values())
                ).exec()
            if answer.has_error():
                if answer.error().code() == pb_utils.TritonError.CANCELLED:
                    raise diffusion.Cancelled(answer.error().message())
                raise StageFailed(answer.error())
            tensors.update({t.name(): t for t in answer.output_tensors()})
        return [tensors[name] for name in self.outputs if name in tensors]
