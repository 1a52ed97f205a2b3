"""Triton python model `vocoder`: the component spec in acestep_triton.specs, run by acestep_triton.triton_python."""

from acestep_triton.triton_python import ComponentModel


class TritonPythonModel(ComponentModel):
    component = "vocoder"
