"""Batching requests of different lengths into one component call, and cutting the padding off again.

Used by the Triton python models under dynamic batching: each request carries its own batch
of rows; rows are concatenated, ragged inputs zero-padded on their variable axis (their masks
then mark the padding), and each request gets back exactly its rows and lengths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from acestep_triton.specs import ADAPTER_ROWS, ComponentSpec


def _variable_axis(dims: tuple[int, ...]) -> int:
    """Axis (counting the batch axis) of the first variable dim of a spec."""
    return 1 + dims.index(-1)


def collate(spec: ComponentSpec, requests: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate each input over requests; ragged inputs are zero-padded to the longest. The per-row
    adapter tensors (specs.ADAPTER_ROWS) are concatenated too when the requests carry them."""
    batch = {name: torch.cat([r[name] for r in requests]) for name in ADAPTER_ROWS if name in requests[0]}
    for tensor_spec in spec.inputs:
        parts = [r[tensor_spec.name] for r in requests]
        if tensor_spec.name in spec.ragged_inputs:
            axis = _variable_axis(tensor_spec.dims)
            longest = max(p.shape[axis] for p in parts)
            parts = [_pad_axis(p, axis, longest) for p in parts]
        batch[tensor_spec.name] = torch.cat(parts, dim=0)
    return batch


def _pad_axis(t: torch.Tensor, axis: int, length: int) -> torch.Tensor:
    missing = length - t.shape[axis]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - axis - 1) + [0, missing]
    return F.pad(t, pad)


def split(
    spec: ComponentSpec,
    requests: Sequence[Mapping[str, torch.Tensor]],
    outputs: Mapping[str, torch.Tensor],
) -> list[dict[str, torch.Tensor]]:
    """Give each request its rows of every output, with ragged outputs cut to its own length."""
    lengths_from = dict(spec.ragged_outputs)
    out_dims = {t.name: t.dims for t in spec.outputs}
    in_dims = {t.name: t.dims for t in spec.inputs}
    results, start = [], 0
    for request in requests:
        rows = next(iter(request.values())).shape[0]
        mine = {}
        for name, value in outputs.items():
            value = value[start : start + rows]
            if name in lengths_from:
                source = lengths_from[name]
                length = request[source].shape[_variable_axis(in_dims[source])]
                value = value.narrow(_variable_axis(out_dims[name]), 0, length)
            mine[name] = value
        results.append(mine)
        start += rows
    return results
