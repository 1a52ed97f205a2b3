"""Fused ReLU linear attention for the DiT's self-attention, written in Triton (opt-in, GPU).

`LinearSelfAttention` in torch materialises RoPE'd, ReLU'd, masked copies of q, k and v and a
padded, transposed v before its two products: memory-bound passes that grow with rows and made
batching not pay (benchmarks/NOTES.md, issue 10). Here two kernels read the projections once:

- `_kv_summary_kernel`: per (batch row, head, frame split) RoPE + ReLU + mask on k, mask on v,
  and the partial sums kv = v^T k [D, D] and ksum = sum_t k [D] in float32;
- `_apply_kernel`: per (batch row, head, frame block) RoPE + ReLU + mask on q, then
  out = (q kv^T) / (q . ksum + eps), written straight into the [B, T, H*D] layout `to_out` reads.

Same math as `LinearSelfAttention.forward` (the products take operands in the input dtype and
accumulate in float32). Off by default (`Acceleration.fused_linear_attention`): checked in Triton's
CPU interpreter (tests/test_engine_speed.py) and for one full-size layer on an H200 (numerics and
eager timing in benchmarks/NOTES.md), but untuned and not yet measured inside the compiled decode.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from acestep_triton.models.attention import LINEAR_ATTENTION_EPS

BLOCK_T = 64
# frame splits of the K^T V reduction: enough programs to fill the GPU at one batch row
SUMMARY_SPLITS = 8


@triton.jit
def _rope_relu(x_ptr, row_offsets, dims, cos_ptr, sin_ptr, frames, mask_ptr, valid, head_dim: tl.constexpr):
    """Load a [BLOCK, D] block, rotate adjacent pairs by RoPE, ReLU, zero masked frames (float32)."""
    x = tl.load(x_ptr + row_offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    partner = tl.load(x_ptr + row_offsets[:, None] + (dims ^ 1)[None, :], mask=valid[:, None], other=0.0)
    sign = tl.where(dims % 2 == 0, -1.0, 1.0)
    table = frames[:, None] * head_dim + dims[None, :]
    cos = tl.load(cos_ptr + table, mask=valid[:, None], other=0.0)
    sin = tl.load(sin_ptr + table, mask=valid[:, None], other=0.0)
    x = x * cos + partner.to(tl.float32) * sign[None, :] * sin
    keep = tl.load(mask_ptr + frames, mask=valid, other=0.0).to(tl.float32)
    return tl.maximum(x, 0.0) * keep[:, None]


@triton.jit
def _kv_summary_kernel(k_ptr, v_ptr, cos_ptr, sin_ptr, mask_ptr, kv_ptr, ksum_ptr, frames_total, heads,
                       frames_per_split, head_dim: tl.constexpr, block_t: tl.constexpr):
    row_head = tl.program_id(0)
    split = tl.program_id(1)
    row = row_head // heads
    head = row_head % heads
    dims = tl.arange(0, head_dim)
    kv = tl.zeros((head_dim, head_dim), dtype=tl.float32)
    ksum = tl.zeros((head_dim,), dtype=tl.float32)
    start = split * frames_per_split
    for first in range(start, start + frames_per_split, block_t):
        frames = first + tl.arange(0, block_t)
        valid = (frames < frames_total) & (frames < start + frames_per_split)
        offsets = (row * frames_total + frames) * heads * head_dim + head * head_dim
        key = _rope_relu(k_ptr, offsets, dims, cos_ptr, sin_ptr, frames, mask_ptr + row * frames_total, valid,
                         head_dim)
        keep = tl.load(mask_ptr + row * frames_total + frames, mask=valid, other=0.0).to(tl.float32)
        value = tl.load(v_ptr + offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        value = value.to(tl.float32) * keep[:, None]
        operand_dtype = k_ptr.dtype.element_ty
        kv += tl.dot(tl.trans(value.to(operand_dtype)), key.to(operand_dtype), out_dtype=tl.float32)
        ksum += tl.sum(key, axis=0)
    out = (row_head * tl.num_programs(1) + split) * head_dim
    tl.store(kv_ptr + (out + dims[:, None]) * head_dim + dims[None, :], kv)
    tl.store(ksum_ptr + out + dims, ksum)


@triton.jit
def _apply_kernel(q_ptr, cos_ptr, sin_ptr, mask_ptr, kv_ptr, ksum_ptr, out_ptr, frames_total, heads, eps,
                  head_dim: tl.constexpr, block_t: tl.constexpr):
    row_head = tl.program_id(0)
    block = tl.program_id(1)
    row = row_head // heads
    head = row_head % heads
    dims = tl.arange(0, head_dim)
    frames = block * block_t + tl.arange(0, block_t)
    valid = frames < frames_total
    offsets = (row * frames_total + frames) * heads * head_dim + head * head_dim
    query = _rope_relu(q_ptr, offsets, dims, cos_ptr, sin_ptr, frames, mask_ptr + row * frames_total, valid,
                       head_dim)
    kv = tl.load(kv_ptr + (row_head * head_dim + dims[:, None]) * head_dim + dims[None, :])  # [Dv, Dk]
    ksum = tl.load(ksum_ptr + row_head * head_dim + dims)
    operand_dtype = q_ptr.dtype.element_ty
    numerator = tl.dot(query.to(operand_dtype), tl.trans(kv.to(operand_dtype)), out_dtype=tl.float32)
    denominator = tl.sum(query * ksum[None, :], axis=1)
    out = numerator / (denominator[:, None] + eps)
    tl.store(out_ptr + offsets[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=valid[:, None])


def fused_linear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, frame_mask: torch.Tensor,
                           cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """ReLU linear attention of projections q, k, v [B, T, H*D] (q already scaled per row), with
    RoPE tables cos/sin [T, D] float32 and frame_mask [B, T] -> [B, T, H*D] in q's dtype."""
    batch, frames, inner = query.shape
    head_dim = inner // heads
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    mask = frame_mask.to(query.dtype).contiguous()
    frames_per_split = triton.cdiv(triton.cdiv(frames, SUMMARY_SPLITS), BLOCK_T) * BLOCK_T
    splits = triton.cdiv(frames, frames_per_split)
    kv = torch.empty(batch * heads, splits, head_dim, head_dim, device=query.device, dtype=torch.float32)
    ksum = torch.empty(batch * heads, splits, head_dim, device=query.device, dtype=torch.float32)
    _kv_summary_kernel[(batch * heads, splits)](key, value, cos, sin, mask, kv, ksum, frames, heads,
                                                frames_per_split, head_dim=head_dim, block_t=BLOCK_T, num_warps=8)
    kv, ksum = kv.sum(dim=1).contiguous(), ksum.sum(dim=1).contiguous()
    out = torch.empty_like(query)
    _apply_kernel[(batch * heads, triton.cdiv(frames, BLOCK_T))](query, cos, sin, mask, kv, ksum, out, frames,
                                                                 heads, LINEAR_ATTENTION_EPS, head_dim=head_dim,
                                                                 block_t=BLOCK_T, num_warps=8)
    return out
