"""Golden cases of the official implementation (../shared/golden) as our request type."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from acestep_triton.contract import GenerationParams

# The golden cases every parity test runs (golden/README.md describes them).
GOLDEN_CASES = ("a_euler_apg_erg", "b_heun_cfg_noerg", "e_empty_lyrics")


def _seeds(manual_seeds) -> tuple[int, ...]:
    if isinstance(manual_seeds, int):
        return (manual_seeds,)
    if isinstance(manual_seeds, str):
        return tuple(int(s) for s in manual_seeds.split(","))
    return tuple(int(s) for s in manual_seeds)


def golden_params(golden_dir: Path, case: str) -> GenerationParams:
    """The case's `call_kwargs` as a contract request."""
    kw = dict(json.loads((golden_dir / f"{case}.json").read_text())["call_kwargs"])
    kw["actual_seeds"] = _seeds(kw.pop("manual_seeds"))
    kw["oss_steps"] = tuple(kw.get("oss_steps") or ())
    return GenerationParams(**kw)


def golden_tensors(golden_dir: Path, case: str) -> dict[str, torch.Tensor]:
    return load_file(str(golden_dir / f"{case}.safetensors"))
