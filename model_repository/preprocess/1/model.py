"""Triton python model `preprocess`: validate the request, tokenize, lay out one row per guidance branch.

Inputs: the `acestep` ensemble inputs (acestep_triton.contract.ENSEMBLE_INPUTS, and the optional
TASK_INPUTS: the source audio is checked against the task here, before any model runs, and so is the
LoRA adapter against this deployment's: acestep_triton.adapters).
Outputs: TEXT_IDS/TEXT_MASK [K, Lt], TEXT_Q_SCALE/TEXT_SCALE/LYRIC_Q_SCALE [K, 1],
LYRIC_IDS/LYRIC_MASK [K, Ll] (K condition rows: contract.condition_branches), ADAPTER/ADAPTER_WEIGHT
[K, 1] (the request's LoRA adapter), SEEDS [B], RETAKE_SEEDS_USED [B], DURATION [1], TIME_PREPROCESS [1, 1].
"""

import time

import numpy as np

from acestep_triton.adapters import adapter_arrays, resolver_from_parameters
from acestep_triton.checkpoint import deployment_checkpoint, find_lyric_vocab
from acestep_triton.lyrics import LyricTokenizer
from acestep_triton.preprocess import prepare_request, warm_up
from acestep_triton.text_tokenizer import TextTokenizer
from acestep_triton.triton_python import (
    error_response,
    model_parameters,
    request_params,
    request_source,
    response,
)


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        ckpt = deployment_checkpoint(params["CHECKPOINT"])
        self.text_tokenizer = TextTokenizer.from_pretrained(ckpt.text_encoder)
        self.lyric_tokenizer = LyricTokenizer.from_file(find_lyric_vocab(ckpt, params.get("LYRIC_VOCAB")))
        warm_up(self.text_tokenizer.tokenize_one, self.lyric_tokenizer.tokenize)
        self.adapters = resolver_from_parameters(params)

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        start = time.perf_counter()
        try:
            params = request_params(request)
            adapter = self.adapters.check(params.lora_name_or_path)
            prepared = prepare_request(params, self.text_tokenizer.tokenize_one, self.lyric_tokenizer.tokenize,
                                       request_source(request))
        except Exception as exc:
            return error_response(exc)
        return response({
            **prepared.tensors(),
            **adapter_arrays(adapter, params.lora_weight, len(prepared.branches)),
            "TIME_PREPROCESS": np.asarray([[time.perf_counter() - start]], dtype=np.float32),
        })
