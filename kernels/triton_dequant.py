"""Triton dequant-matmul kernels: y = x · dequant(Q)ᵀ and dx = dy · dequant(Q).

Both read the packed codes (qft.packing layout: per row a little-endian bit
stream of k-bit codes in int32 words) and dequantize a tile in registers:

    W[n, k] = (codebook[code[n, k]] − zero[n, k // BLOCK]) · scale[n, k // BLOCK]

so the dense weight never exists in memory. One kernel pair serves every
format: NF-k and FP8 (codebook lookup, no zero) and int-k (codebook 0..2^k−1
with zero-points). Accumulation is in fp32; fp32 activations use IEEE fp32
dot products, fp16/bf16 ones the tensor cores (the weight tile is cast to the
activations' dtype).

Paths: small batches (<= 32 rows) use 16- or 32-row tiles and split K across
programs while the output tiles alone would leave the GPU half idle (partial
sums in an fp32 buffer, added in a fixed order: deterministic); larger batches
use 64-128 tiles without split-K. Block sizes are fixed heuristics: they have
not been tuned on a GPU yet (see benchmarks/RESULTS.md).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_tile(
    codes_ptr, words_per_row, codebook_ptr, scale_ptr, scale_sn, scale_sb, zero_ptr, zero_sn, zero_sb,
    offs_n, offs_k, N, K,
    BITS: tl.constexpr, BLOCK: tl.constexpr, HAS_ZERO: tl.constexpr,
):
    """fp32 tile W[offs_n, offs_k] (rows x cols), 0 outside the matrix."""
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    bit = offs_k * BITS
    word = bit >> 5
    shift = (bit & 31).to(tl.uint32)
    row = codes_ptr + offs_n[:, None].to(tl.int64) * words_per_row
    lo = tl.load(row + word[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
    bits = lo >> shift[None, :]
    if 32 % BITS != 0:  # a code may straddle two words
        has_hi = mask & (word[None, :] + 1 < words_per_row)
        hi = tl.load(row + word[None, :] + 1, mask=has_hi, other=0).to(tl.uint32, bitcast=True)
        bits = bits | ((hi << (31 - shift[None, :])) << 1)  # two shifts: a shift by 32 is undefined
    code = (bits & ((1 << BITS) - 1)).to(tl.int32)
    value = tl.load(codebook_ptr + code, mask=mask, other=0.0)
    block = offs_k // BLOCK
    scale = tl.load(scale_ptr + offs_n[:, None] * scale_sn + block[None, :] * scale_sb, mask=mask, other=0.0)
    if HAS_ZERO:
        zero = tl.load(zero_ptr + offs_n[:, None] * zero_sn + block[None, :] * zero_sb, mask=mask, other=0.0)
        value = value - zero
    return value * scale


@triton.jit
def _forward_kernel(
    x_ptr, y_ptr, codes_ptr, words_per_row, codebook_ptr, scale_ptr, scale_sn, scale_sb, zero_ptr, zero_sn, zero_sb,
    M, N, K, stride_xm, stride_ym, stride_ysplit, k_per_split,
    BITS: tl.constexpr, BLOCK: tl.constexpr, HAS_ZERO: tl.constexpr, FP32_DOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """y[split] = x[:, split's K range] @ W[:, same range].T; with one split, y itself."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    split = tl.program_id(2)
    k_start = split * k_per_split
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BK):
        offs_k = k0 + tl.arange(0, BK)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
        w = _dequant_tile(codes_ptr, words_per_row, codebook_ptr, scale_ptr, scale_sn, scale_sb,
                          zero_ptr, zero_sn, zero_sb, offs_n, offs_k, N, K, BITS, BLOCK, HAS_ZERO)
        if FP32_DOT:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y_ptrs = y_ptr + split.to(tl.int64) * stride_ysplit + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _input_grad_kernel(
    dy_ptr, dx_ptr, codes_ptr, words_per_row, codebook_ptr, scale_ptr, scale_sn, scale_sb, zero_ptr, zero_sn, zero_sb,
    M, N, K, stride_dym, stride_dxm,
    BITS: tl.constexpr, BLOCK: tl.constexpr, HAS_ZERO: tl.constexpr, FP32_DOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        dy_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        dy = tl.load(dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :], mask=dy_mask, other=0.0)
        w = _dequant_tile(codes_ptr, words_per_row, codebook_ptr, scale_ptr, scale_sn, scale_sb,
                          zero_ptr, zero_sn, zero_sb, offs_n, offs_k, N, K, BITS, BLOCK, HAS_ZERO)
        if FP32_DOT:
            acc += tl.dot(dy.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(dy, w.to(dy.dtype))
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=mask)


def _fp32_dot(dtype: torch.dtype) -> bool:
    """IEEE fp32 dot products for fp32 activations. Also for bf16 under TRITON_INTERPRET: Triton's
    interpreter (3.9) computes bf16 tl.dot wrongly, so there the bf16 tensor-core path is left to GPU checks."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def _strides(t: torch.Tensor) -> tuple[int, int]:
    """Row and block strides of a (rows or 1, blocks) scale, 0 where it broadcasts."""
    return (t.stride(0) if t.shape[0] > 1 else 0), (t.stride(1) if t.shape[1] > 1 else 0)


def _weight_args(codes, codebook, scale, zero):
    scale = scale.float().contiguous()
    zero = None if zero is None else zero.float().contiguous()
    return (
        codes, codes.shape[1], codebook.float().contiguous(), scale, *_strides(scale),
        scale if zero is None else zero, *((0, 0) if zero is None else _strides(zero)),
    )


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def _check(out, shape, like):
    if out is None:
        return like.new_empty(shape)
    if tuple(out.shape) != shape or not out.is_contiguous() or out.dtype != like.dtype:
        raise ValueError(f"out must be a contiguous {like.dtype} tensor of shape {shape}")
    return out


def forward(x2d, codes, codebook, scale, zero, *, bits: int, cols: int, block: int, out=None) -> torch.Tensor:
    """y (M, N) = x2d (M, K) @ dequant(Q).T, in x2d's dtype (written into ``out`` if given).

    The row tile grows with M; while the grid of output tiles is smaller than
    twice the SM count, K is split across programs (the memory-bound small-batch
    case). Split-K partial sums go to an fp32 buffer and are added in a fixed
    order, so results are deterministic.
    """
    x2d, codes = x2d.contiguous(), codes.contiguous()
    m, k = x2d.shape
    n = codes.shape[0]
    fp32_dot = _fp32_dot(x2d.dtype)
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if (m <= 64 or fp32_dot) else 128
    bn, bk = (64, 64) if bm <= 32 else ((64, 32) if fp32_dot else (128, 32))
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    k_blocks = triton.cdiv(k, bk)
    split = max(1, min(k_blocks, 2 * _sm_count(x2d.device) // tiles)) if bm <= 32 else 1
    k_per_split = triton.cdiv(k_blocks, split) * bk
    split = triton.cdiv(k, k_per_split)
    out = _check(out, (m, n), x2d)
    target = out if split == 1 else torch.empty(split, m, n, device=x2d.device, dtype=torch.float32)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
    _forward_kernel[grid](
        x2d, target, *_weight_args(codes, codebook, scale, zero), m, n, k, x2d.stride(0), n, m * n,
        k_per_split, BITS=bits, BLOCK=block, HAS_ZERO=zero is not None, FP32_DOT=fp32_dot,
        BM=bm, BN=bn, BK=bk, num_warps=8 if bm * bn >= 128 * 64 else 4,
    )
    if split > 1:
        out.copy_(target.sum(dim=0))
    return out


def input_grad(dy2d, codes, codebook, scale, zero, *, bits: int, cols: int, block: int, out=None) -> torch.Tensor:
    """dx (M, K) = dy2d (M, N) @ dequant(Q), in dy2d's dtype (written into ``out`` if given)."""
    dy2d, codes = dy2d.contiguous(), codes.contiguous()
    m, n = dy2d.shape
    fp32_dot = _fp32_dot(dy2d.dtype)
    bm, bn, bk = (16, 64, 64) if m <= 16 else ((64, 32, 64) if fp32_dot else (128, 32, 128))
    dx = _check(out, (m, cols), dy2d)
    grid = (triton.cdiv(m, bm), triton.cdiv(cols, bk))
    _input_grad_kernel[grid](
        dy2d, dx, *_weight_args(codes, codebook, scale, zero), m, n, cols, dy2d.stride(0), dx.stride(0),
        BITS=bits, BLOCK=block, HAS_ZERO=zero is not None, FP32_DOT=fp32_dot, BM=bm, BN=bn, BK=bk,
        num_warps=8 if bm * bk >= 128 * 64 else 4,
    )
    return dx
