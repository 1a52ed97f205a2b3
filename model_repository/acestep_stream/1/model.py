"""Triton python model `acestep_stream` (decoupled): the `acestep` ensemble's stages, reporting progress.

Inputs: the ensemble's (acestep_triton.contract.ENSEMBLE_INPUTS and the optional TASK_INPUTS) and
STREAM_AUDIO. Responses: one per stage start and one after every diffusion step, each with STAGE [1]
(string), STEP [1] (steps done, never decreasing) and STEPS [1] (int32); then the last, flagged
final, with the ensemble's outputs (WAVEFORM [items, 2, samples], SEEDS, RETAKE_SEEDS_USED,
DURATION, TIME_<STAGE>) or an error whose text starts with its code's name
(acestep_triton.contract.stream_error_text: a gRPC stream carries no status code).

preprocess, text_encoder, condition_encoder, dcae_decoder and vocoder are called by BLS, in the
ensemble's order and with its tensor names (the STAGES parameter, written by
export.build_repository from the same specs). The sampling loop runs here, as the `diffusion`
model's own class (imported from its model.py next to this model, not copied), with its
`after_step` extended to send each step and to stop when the client cancelled: the gRPC stream's
cancellation reaches this request directly, which a loop inside the ensemble does not see until
the ensemble's next step.

With STREAM_AUDIO true the vocoder is called once per chunk of the mel
(acestep_triton.audio_stream) and every chunk's audio is sent as it is decoded (AUDIO,
AUDIO_OFFSET, AUDIO_SAMPLES in a "vocoder" progress response); the final WAVEFORM is the chunks
put together, so a client that wrote the chunks holds the final audio.
"""

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from acestep_triton.audio_stream import vocode_in_chunks
from acestep_triton.checkpoint import VOCODER_DIR, deployment_checkpoint
from acestep_triton.contract import (
    AUDIO_CHUNK,
    AUDIO_OFFSET,
    AUDIO_SAMPLES,
    ENSEMBLE_OUTPUTS,
    STREAM_AUDIO,
    STREAM_CHUNK_FRAMES,
    STREAM_ERROR_CODES,
    stage_time_name,
    stream_error_text,
)
from acestep_triton.models.vocoder import receptive_context_frames
from acestep_triton.sampling.tasks import loop_steps
from acestep_triton.triton_python import error_response, model_parameters, request_params

_DIFFUSION_SOURCE = Path(__file__).resolve().parents[2] / "diffusion" / "1" / "model.py"
_spec = importlib.util.spec_from_file_location("acestep_diffusion_model", _DIFFUSION_SOURCE)
diffusion = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diffusion)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def final_error(error) -> "pb_utils.InferenceResponse":
    """The stream's last response for `error` (a TritonError): its code's name leads its text.
    (pb_utils.TritonError exists only once the stub runs, not at import.)"""
    code = error.code()
    names = {getattr(pb_utils.TritonError, name): name for name in STREAM_ERROR_CODES}
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(stream_error_text(names.get(code, "UNKNOWN"), error.message()), code))


class StageFailed(Exception):
    """A stage answered an error; `error` is its TritonError, passed on as it is."""

    def __init__(self, error) -> None:
        super().__init__(error.message())
        self.error = error


class _LoopRequest:
    """The loop's view of a stream request: its inputs gathered from the earlier stages, its
    cancellation and its response sender those of the stream request; `steps` the loop's step
    count, as it reports it."""

    def __init__(self, tensors: dict, sender, steps: int) -> None:
        self._tensors = tensors
        self.sender = sender
        self.steps = steps

    def inputs(self) -> list:
        return list(self._tensors.values())

    def is_cancelled(self) -> bool:
        return self.sender.is_cancelled()


def progress_response(stage: str, step: int, steps: int, extra: dict | None = None):
    """A progress response (PROGRESS_OUTPUTS), with `extra` arrays by name (a streamed audio chunk)."""
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("STAGE", np.array([stage.encode()], dtype=np.object_)),
        pb_utils.Tensor("STEP", np.array([step], dtype=np.int32)),
        pb_utils.Tensor("STEPS", np.array([steps], dtype=np.int32)),
        *(pb_utils.Tensor(name, array) for name, array in (extra or {}).items()),
    ])


class TritonPythonModel(diffusion.TritonPythonModel):
    def initialize(self, args):
        super().initialize(args)
        params = model_parameters(args)
        self.stages = json.loads(params["STAGES"])
        self.loop_stage = params["LOOP_STAGE"]
        self.vocoder_stage = params["VOCODER_STAGE"]
        self.outputs = [t.name for t in ENSEMBLE_OUTPUTS]
        self.vocoder_context = receptive_context_frames(deployment_checkpoint(params["CHECKPOINT"]).config(VOCODER_DIR))

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                outputs = self._run(request, sender)
            except diffusion.Cancelled as exc:
                sender.send(final_error(pb_utils.TritonError(str(exc), pb_utils.TritonError.CANCELLED)), flags=FINAL)
            except StageFailed as exc:
                sender.send(final_error(exc.error), flags=FINAL)
            except Exception as exc:
                sender.send(final_error(error_response(exc, request.request_id()).error()), flags=FINAL)
            else:
                sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL)
        return None

    def after_step(self, request, step: int, total: int) -> None:
        super().after_step(request, step, total)
        request.steps = total
        request.sender.send(progress_response(self.loop_stage, step + 1, total))

    def _run(self, request, sender) -> list:
        """Every stage in order; the ensemble's outputs (pb_utils.Tensors).

        The request is validated here first: an error a stage answers through BLS reaches this
        model as INTERNAL whatever its code was, and a bad input must stay INVALID_ARG."""
        params = request_params(request)
        tensors = {t.name(): t for t in request.inputs()}
        flag = tensors.pop(STREAM_AUDIO.name, None)
        stream_audio = flag is not None and bool(flag.as_numpy().reshape(-1)[0])
        # the task's step count (a repaint of the whole source runs as a retake: the loop corrects it)
        steps = loop_steps(params)
        done = 0  # steps done: 0 before the loop, all of them after it
        for stage in self.stages:
            if sender.is_cancelled():
                raise diffusion.Cancelled(f"cancelled before {stage['model']}")
            sender.send(progress_response(stage["model"], done, steps))
            inputs = {name: tensors[name] for name in stage["inputs"] if name in tensors}  # optional ones may lack
            if stage["model"] == self.loop_stage:
                loop_request = _LoopRequest(inputs, sender, steps)
                answer = self._one(loop_request)
                done = steps = loop_request.steps
            elif stage["model"] == self.vocoder_stage and stream_audio:
                tensors.update(self._vocode_streaming(stage, inputs, sender, steps))
                continue
            else:
                answer = pb_utils.InferenceRequest(
                    model_name=stage["model"], requested_output_names=stage["outputs"], inputs=list(inputs.values()),
                    request_id=request.request_id(),  # the gateway's X-Request-ID, in Triton's logs and traces
                ).exec()
            if answer.has_error():
                if answer.error().code() == pb_utils.TritonError.CANCELLED:
                    raise diffusion.Cancelled(answer.error().message())
                raise StageFailed(answer.error())
            tensors.update({t.name(): t for t in answer.output_tensors()})
        return [tensors[name] for name in self.outputs if name in tensors]

    def _vocode_streaming(self, stage: dict, inputs: dict, sender, steps: int) -> dict:
        """The vocoder stage chunk by chunk, each chunk's audio sent as it is decoded; the stage's
        outputs (the whole WAVEFORM, its time) as pb_utils.Tensors by name."""
        start = time.perf_counter()
        (mel_name,) = stage["inputs"]
        mel = torch.from_dlpack(inputs[mel_name].to_dlpack())

        def vocode(chunk: torch.Tensor) -> torch.Tensor:
            if sender.is_cancelled():
                raise diffusion.Cancelled("cancelled while vocoding")
            answer = pb_utils.InferenceRequest(
                model_name=stage["model"], requested_output_names=["WAVEFORM"],
                inputs=[pb_utils.Tensor(mel_name, chunk.contiguous().cpu().numpy())],
            ).exec()
            if answer.has_error():
                raise StageFailed(answer.error())
            wave = pb_utils.get_output_tensor_by_name(answer, "WAVEFORM")
            return torch.from_dlpack(wave.to_dlpack()).cpu()

        pieces = []
        for offset, piece, total in vocode_in_chunks(mel, vocode, self.vocoder_context, STREAM_CHUNK_FRAMES):
            pieces.append(piece)
            sender.send(progress_response(stage["model"], steps, steps, {
                AUDIO_CHUNK.name: piece.numpy(),
                AUDIO_OFFSET.name: np.array([offset], dtype=np.int64),
                AUDIO_SAMPLES.name: np.array([total], dtype=np.int64),
            }))
        seconds = np.full((mel.shape[0], 1), time.perf_counter() - start, dtype=np.float32)
        return {
            "WAVEFORM": pb_utils.Tensor("WAVEFORM", torch.cat(pieces, dim=-1).numpy()),
            stage_time_name("vocoder"): pb_utils.Tensor(stage_time_name("vocoder"), seconds),
        }
