"""Triton python model `dcae_encoder`: the component spec in acestep_triton.specs, run by acestep_triton.triton_python.

Called by the `diffusion` loop (BLS) for the tasks that start from audio, not by the ensemble.
"""

from acestep_triton.triton_python import ComponentModel


class TritonPythonModel(ComponentModel):
    component = "dcae_encoder"
