"""One request to `acestep_stream` over gRPC, for the tests that read its responses themselves."""

from __future__ import annotations

import queue

import tritonclient.grpc as grpcclient

from acestep_triton.contract import STREAM_MODEL_NAME


def stream_responses(grpc_url: str, inputs: list, timeout_s: float = 300.0) -> list:
    """Every response of one stream request, in order, up to its last: the result carrying WAVEFORM, or
    the error (tritonclient's InferenceServerException) that ended the stream."""
    answers: queue.Queue = queue.Queue()
    responses = []
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(STREAM_MODEL_NAME, inputs)
        while True:
            result, error = answers.get(timeout=timeout_s)
            responses.append(result if error is None else error)
            if error is not None or result.as_numpy("WAVEFORM") is not None:
                break
        client.stop_stream()
    finally:
        client.close()
    return responses
