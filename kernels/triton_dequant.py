"""Triton dequant-matmul kernels: y = x · dequant(Q)ᵀ, dx = dy · dequant(Q), and
the gradient of trainable scales (PEQA).

All read the packed codes (qft.quant.packing layout: per row a little-endian bit
stream of k-bit codes in int32 words) and dequantize a tile in registers:

    W[n, k] = (codebook[code[n, k]] − zero[n, k // block]) · scale[n, k // block]

so the dense weight never exists in memory. One kernel per product serves
every format; accumulation is in fp32 on the tensor cores, the weight tile cast
to the activations' dtype (fp16 or bf16).

The scale gradient (PEQA trains only the scales),

    dscale[n, b] = Σ_{k in block b} (dyᵀx)[n, k] · (codebook[code[n, k]] − zero[n, b]),

never stores the dense dW = dyᵀx either: each program accumulates one tile of
it over all tokens, multiplies it by the unscaled weight tile and sums each run
of columns sharing a scale into small fp32 partials, summed per block
afterwards in a fixed order (deterministic).

How a tile is read:
- k ∈ {1, 2, 4, 8}: each int32 word is loaded once and all 32/k codes are
  shifted out of it; other widths load the one or two words under each code.
- int-k (codebook 0..2^k−1, detected once per codebook tensor): the code is
  cast to float, no codebook gather.
- scales and zero-points are loaded once per run of columns sharing them
  (``SCALE_G``), and ``block`` is a runtime value, so per-channel and FP8
  formats compile once, not once per matrix width.

Paths by batch M (rows of x):
- M < ``DENSE_FROM_M``: fused kernels, tiles from ``FORWARD_CONFIGS`` /
  ``INPUT_GRAD_CONFIGS`` by M bucket, chosen by ``triton.autotune`` per
  (M bucket, N, K). Up to M = 64 the reduction is split across programs while
  the output tiles alone would leave the GPU half idle; the partial sums go to
  a reused fp32 buffer and are added in a fixed order (deterministic).
- M ≥ ``DENSE_FROM_M``, and fp32 activations at any M: the weight is
  dequantized into a temporary in the activations' dtype and multiplied by
  cuBLAS (at large batch the matmul is compute bound and cuBLAS is the fastest
  there is; a fused IEEE fp32 dot runs on CUDA cores and spills registers).
  The temporary dies with the call; fp32 stays IEEE unless TF32 is enabled
  for matmuls, as for nn.Linear.
- Scale gradient: the fused kernel at every M and dtype (tiles from
  ``SCALE_GRAD_CONFIGS`` by M bucket, autotuned likewise); cuBLAS would need
  the dense dW the kernel exists to avoid.

Autotuning is off (the first config of each list) under ``TRITON_INTERPRET=1``
and when ``QFT_TRITON_AUTOTUNE=0``; ``config=`` pins one config explicitly
(tests, benchmarks). None of the tile choices has been measured on a GPU yet.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import functools
import math
import os
import weakref

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("QFT_TRITON_AUTOTUNE", "1") != "0" and not INTERPRET
DENSE_FROM_M = 1024  # from this batch on: dequantize to a temporary, then cuBLAS


def _configs(rows):
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in rows]


# (BM, BN, BK, warps, stages) per M bucket; the first of each list is the default when autotuning is off.
# All compile for sm_90 without register spills for NF2/NF4/int4/FP8 (checked with ptxas, no GPU at hand);
# 3-bit codes spill a little in some. Not yet timed on a GPU.
# forward: BN output columns (rows of W) per program, BK the reduction step along the packed rows.
FORWARD_CONFIGS = {
    16: _configs([(16, 32, 128, 4, 4), (16, 64, 128, 8, 4), (16, 64, 64, 4, 4)]),  # GEMV-like
    64: _configs([(64, 128, 64, 8, 3), (64, 64, 128, 8, 3), (32, 64, 64, 4, 4)]),
    1024: _configs([(128, 128, 32, 8, 4), (128, 64, 64, 8, 4), (128, 128, 64, 8, 3)]),
}
# input-grad: BK output columns (columns of W) per program, BN the reduction step over rows of W.
INPUT_GRAD_CONFIGS = {
    16: _configs([(16, 32, 128, 4, 4), (16, 64, 128, 8, 4), (16, 128, 64, 4, 3)]),
    64: _configs([(64, 64, 128, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4)]),
    1024: _configs([(128, 32, 128, 8, 4), (128, 64, 128, 8, 3), (64, 64, 128, 4, 4)]),
}
# A split's share of the reduction is a multiple of every reduction step above.
SPLIT_UNIT = max(c.kwargs[key] for table, key in ((FORWARD_CONFIGS, "BK"), (INPUT_GRAD_CONFIGS, "BN"))
                 for bucket in (16, 64) for c in table[bucket])
MAX_SCALE_G = 128  # the widest tile: per-row scales of any matrix width share one compile
# scale-grad: BN rows × BK columns of dW = dyᵀx per program, BM the reduction step over tokens. One BK for all,
# so the width of the partial sums (one per G ≤ BK columns) does not depend on the autotuner's pick. All compile
# for sm_90 without spills for 2/4/8-bit codes, bf16 and IEEE fp32 (ptxas, no GPU); 3-bit fp32 spills 4 bytes
# in one. Not yet timed on a GPU.
SCALE_GRAD_BK = 64
SCALE_GRAD_CONFIGS = {
    16: _configs([(16, 64, SCALE_GRAD_BK, 4, 3), (16, 128, SCALE_GRAD_BK, 8, 3)]),
    64: _configs([(32, 64, SCALE_GRAD_BK, 4, 3), (64, 64, SCALE_GRAD_BK, 4, 3)]),
    1024: _configs([(64, 64, SCALE_GRAD_BK, 4, 3), (64, 128, SCALE_GRAD_BK, 8, 3), (32, 128, SCALE_GRAD_BK, 4, 4)]),
}


def _bucket(m: int) -> int:
    return 16 if m <= 16 else 64 if m <= 64 else 1024


def _pick(table, configs, nargs, **kwargs):
    """The autotuner's candidates: the M bucket's configs (only the first when autotuning is off)."""
    candidates = table[nargs["M_BUCKET"]]
    return candidates if AUTOTUNE else candidates[:1]


def _bench(fn, quantiles):
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def _autotuned(table):
    every = [c for bucket in table.values() for c in bucket]
    return triton.autotune(every, key=["M_BUCKET", "N", "K", "BITS", "SCALE_G", "HAS_ZERO", "CODES_ARE_VALUES"],
                           prune_configs_by={"early_config_prune": functools.partial(_pick, table)}, do_bench=_bench)


@triton.jit
def _weight_tile(
    codes_ptr, words_per_row, codebook_ptr, scale_ptr, scale_sn, scale_sb, zero_ptr, zero_sn, zero_sb, block,
    offs_n, k0, N, K,
    BITS: tl.constexpr, SCALE_G: tl.constexpr, HAS_ZERO: tl.constexpr, CODES_ARE_VALUES: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, APPLY_SCALE: tl.constexpr = True,
):
    """fp32 tile W[offs_n, k0 : k0 + BK] (k0 a multiple of BK); without APPLY_SCALE the unscaled grid
    codebook[code] − zero, the scale's gradient factor. Outside the matrix it holds finite values
    (codebook values are finite), which the callers multiply by masked zeros or do not store."""
    row = codes_ptr + offs_n[:, None].to(tl.int64) * words_per_row
    in_rows = offs_n[:, None] < N
    if 32 % BITS == 0:  # whole codes per word: load each word once, shift every code out of it
        CPW: tl.constexpr = 32 // BITS
        offs_w = k0 // CPW + tl.arange(0, BK // CPW)
        words = tl.load(row + offs_w[None, :], mask=in_rows & (offs_w[None, :] < words_per_row), other=0)
        shifts = tl.arange(0, CPW) * BITS
        code = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1), (BN, BK))
    else:  # a code may straddle two words
        offs_k = k0 + tl.arange(0, BK)
        bit = offs_k * BITS
        word = bit >> 5
        shift = (bit & 31).to(tl.uint32)
        mask = in_rows & (offs_k[None, :] < K)
        lo = tl.load(row + word[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
        hi = tl.load(row + word[None, :] + 1, mask=mask & (word[None, :] + 1 < words_per_row), other=0)
        hi = hi.to(tl.uint32, bitcast=True)
        bits = (lo >> shift[None, :]) | ((hi << (31 - shift[None, :])) << 1)  # two shifts: one by 32 is undefined
        code = (bits & ((1 << BITS) - 1)).to(tl.int32)
    if CODES_ARE_VALUES:  # the fp32 with bits 2^23 + code, minus 2^23: exact, cheaper than an int-to-float conversion
        value = (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    else:
        value = tl.load(codebook_ptr + code).to(tl.float32)
    # G consecutive columns share one scale: G divides both BK and the block (or the row is one block).
    G: tl.constexpr = min(SCALE_G, BK)
    offs_g = k0 + tl.arange(0, BK // G) * G
    blk = offs_g // block
    s_mask = in_rows & (offs_g[None, :] < K)
    value = tl.reshape(value, (BN, BK // G, G))
    if HAS_ZERO:
        zero = tl.load(zero_ptr + offs_n[:, None] * zero_sn + blk[None, :] * zero_sb, mask=s_mask, other=0.0)
        value = value - zero.to(tl.float32)[:, :, None]
    if APPLY_SCALE:
        scale = tl.load(scale_ptr + offs_n[:, None] * scale_sn + blk[None, :] * scale_sb, mask=s_mask, other=0.0)
        value = value * scale.to(tl.float32)[:, :, None]
    return tl.reshape(value, (BN, BK))


@_autotuned(FORWARD_CONFIGS)
@triton.jit
def _forward_kernel(
    x_ptr, y_ptr, codes_ptr, words_per_row, codebook_ptr, scale_ptr, scale_sn, scale_sb, zero_ptr, zero_sn, zero_sb,
    block, M, N, K, stride_xm, stride_ym, stride_ysplit, k_per_split, M_BUCKET,
    BITS: tl.constexpr, SCALE_G: tl.constexpr, HAS_ZERO: tl.constexpr, CODES_ARE_VALUES: tl.constexpr,
    FP32_DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """y[split] = x[:, split's K range] @ W[:, same range].T; with one split, y itself."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    split = tl.program_id(2)
    k_start = split * k_per_split
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BK):
        offs_k = k0 + tl.arange(0, BK)
        x = tl.load(x_rows + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _weight_tile(codes_ptr, words_per_row, codebook_ptr, scale_ptr, scale_sn, scale_sb, zero_ptr, zero_sn,
                         zero_sb, block, offs_n, k0, N, K, BITS, SCALE_G, HAS_ZERO, CODES_ARE_VALUES, BN, BK)
        if FP32_DOT:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y_ptrs = y_ptr + split.to(tl.int64) * stride_ysplit + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@_autotuned(INPUT_GRAD_CONFIGS)
@triton.jit
def _input_grad_kernel(
    dy_ptr, dx_ptr, codes_ptr, words_per_row, codebook_ptr, scale_ptr, scale_sn, scale_sb, zero_ptr, zero_sn,
    zero_sb, block, M, N, K, stride_dym, stride_dxm, stride_dxsplit, n_per_split, M_BUCKET,
    BITS: tl.constexpr, SCALE_G: tl.constexpr, HAS_ZERO: tl.constexpr, CODES_ARE_VALUES: tl.constexpr,
    FP32_DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """dx[split] = dy[:, split's N range] @ W[same range, :]; with one split, dx itself."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    k0 = tl.program_id(1) * BK
    offs_k = k0 + tl.arange(0, BK)
    split = tl.program_id(2)
    n_start = split * n_per_split
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    dy_rows = dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym
    for n0 in range(n_start, tl.minimum(n_start + n_per_split, N), BN):
        offs_n = n0 + tl.arange(0, BN)
        dy = tl.load(dy_rows + offs_n[None, :], mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        w = _weight_tile(codes_ptr, words_per_row, codebook_ptr, scale_ptr, scale_sn, scale_sb, zero_ptr, zero_sn,
                         zero_sb, block, offs_n, k0, N, K, BITS, SCALE_G, HAS_ZERO, CODES_ARE_VALUES, BN, BK)
        if FP32_DOT:
            acc += tl.dot(dy.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(dy, w.to(dy.dtype))
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    dx_ptrs = dx_ptr + split.to(tl.int64) * stride_dxsplit + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@_autotuned(SCALE_GRAD_CONFIGS)
@triton.jit
def _scale_grad_kernel(
    x_ptr, dy_ptr, part_ptr, codes_ptr, words_per_row, codebook_ptr, scale_ptr, scale_sn, scale_sb, zero_ptr,
    zero_sn, zero_sb, block, M, N, K, stride_xm, stride_dym, stride_pn, M_BUCKET,
    BITS: tl.constexpr, SCALE_G: tl.constexpr, HAS_ZERO: tl.constexpr, CODES_ARE_VALUES: tl.constexpr,
    FP32_DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """part[n, k // G] = Σ_{G columns k} (dyᵀ x)[n, k] · grid[n, k] for this program's BN rows and BK columns,
    grid the unscaled weight: dW = dyᵀ x exists only as this (BN, BK) tile, summed over all M tokens."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    offs_k = k0 + tl.arange(0, BK)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for m0 in range(0, M, BM):
        offs_m = m0 + tl.arange(0, BM)
        tokens = offs_m[:, None].to(tl.int64)
        in_m = offs_m[:, None] < M
        dy = tl.load(dy_ptr + tokens * stride_dym + offs_n[None, :], mask=in_m & (offs_n[None, :] < N), other=0.0)
        x = tl.load(x_ptr + tokens * stride_xm + offs_k[None, :], mask=in_m & (offs_k[None, :] < K), other=0.0)
        if FP32_DOT:
            acc += tl.dot(tl.trans(dy.to(tl.float32)), x.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(dy), x)
    grid = _weight_tile(codes_ptr, words_per_row, codebook_ptr, scale_ptr, scale_sn, scale_sb, zero_ptr, zero_sn,
                        zero_sb, block, offs_n, k0, N, K, BITS, SCALE_G, HAS_ZERO, CODES_ARE_VALUES, BN, BK,
                        APPLY_SCALE=False)
    G: tl.constexpr = min(SCALE_G, BK)  # the runs of columns _weight_tile reads one scale for
    part = tl.sum(tl.reshape(acc * grid, (BN, BK // G, G)), axis=2)
    offs_g = k0 // G + tl.arange(0, BK // G)
    mask = (offs_n[:, None] < N) & (offs_g[None, :] * G < K)
    tl.store(part_ptr + offs_n[:, None].to(tl.int64) * stride_pn + offs_g[None, :], part, mask=mask)


@triton.jit
def _dequantize_kernel(
    w_ptr, codes_ptr, words_per_row, codebook_ptr, scale_ptr, scale_sn, scale_sb, zero_ptr, zero_sn, zero_sb,
    block, N, K,
    BITS: tl.constexpr, SCALE_G: tl.constexpr, HAS_ZERO: tl.constexpr, CODES_ARE_VALUES: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr,
):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    offs_k = k0 + tl.arange(0, BK)
    w = _weight_tile(codes_ptr, words_per_row, codebook_ptr, scale_ptr, scale_sn, scale_sb, zero_ptr, zero_sn,
                     zero_sb, block, offs_n, k0, N, K, BITS, SCALE_G, HAS_ZERO, CODES_ARE_VALUES, BN, BK)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    tl.store(w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


_VALUES_CACHE: dict[int, tuple[weakref.ref, int, bool]] = {}


def codes_are_values(codebook: torch.Tensor) -> bool:
    """Whether codebook[i] == i for every i (int-k), so a kernel can cast the code instead of gathering.
    Answered once per codebook tensor (and again after it changes in place): the comparison syncs the GPU."""
    key = id(codebook)
    hit = _VALUES_CACHE.get(key)
    if hit is not None and hit[0]() is codebook and hit[1] == codebook._version:
        return hit[2]
    answer = torch.equal(codebook, torch.arange(codebook.numel(), device=codebook.device, dtype=codebook.dtype))
    ref = weakref.ref(codebook, lambda _: _VALUES_CACHE.pop(key, None))
    _VALUES_CACHE[key] = (ref, codebook._version, answer)
    return answer


def _scale_group(block: int, cols: int) -> int:
    """How many consecutive columns, starting at a multiple of that number, always share a scale: the
    largest power of two dividing the block (every column, if one block covers the row), capped."""
    return MAX_SCALE_G if block >= cols else min(block & -block, MAX_SCALE_G)


def _strides(t: torch.Tensor) -> tuple[int, int]:
    """Row and block strides of a (rows or 1, blocks) scale, 0 where it broadcasts."""
    return (t.stride(0) if t.shape[0] > 1 else 0), (t.stride(1) if t.shape[1] > 1 else 0)


def _weight(codes, codebook, scale, zero, bits: int, cols: int, block: int):
    """The weight's kernel arguments and compile-time constants."""
    if codebook.numel() < 1 << bits:
        raise ValueError(f"a {bits}-bit codebook needs {1 << bits} entries, got {codebook.numel()}")
    codes = codes.contiguous()
    args = (codes, codes.shape[1], codebook.contiguous(), scale, *_strides(scale),
            scale if zero is None else zero, *((0, 0) if zero is None else _strides(zero)), block)
    meta = dict(BITS=bits, SCALE_G=_scale_group(block, cols), HAS_ZERO=zero is not None,
                CODES_ARE_VALUES=codes_are_values(codebook))
    return args, meta


def _fp32_dot(dtype: torch.dtype) -> bool:
    """IEEE fp32 dot products for fp32 activations (which reach the fused kernels only with a ``config``).
    Also for bf16 under TRITON_INTERPRET: Triton's interpreter (3.9) computes bf16 tl.dot wrongly, so there
    the bf16 tensor-core path is left to GPU checks."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and INTERPRET)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def _split(out_tiles: int, length: int, bucket: int, device: torch.device) -> tuple[int, int]:
    """(splits, share of each) for a reduction of ``length``: split while the output tiles alone would leave
    the GPU half idle (small batches only); shares are multiples of SPLIT_UNIT."""
    units = triton.cdiv(length, SPLIT_UNIT)
    split = max(1, min(units, 2 * _sm_count(device) // out_tiles)) if bucket <= 64 else 1
    share = triton.cdiv(units, split) * SPLIT_UNIT
    return triton.cdiv(length, share), share


_PARTIALS: dict[tuple, torch.Tensor] = {}


def _partials(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An fp32 buffer for split partial sums, kept per device and stream and grown when needed: calls
    on one stream run in order, so one call's partials are summed before the next call writes."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    numel = math.prod(shape)
    buf = _PARTIALS.get(key)
    if buf is None or buf.numel() < numel:
        buf = _PARTIALS[key] = torch.empty(numel, device=device, dtype=torch.float32)
    return buf[:numel].view(shape)


def _check(out, shape, like):
    if out is None:
        return like.new_empty(shape)
    if tuple(out.shape) != shape or not out.is_contiguous() or out.dtype != like.dtype:
        raise ValueError(f"out must be a contiguous {like.dtype} tensor of shape {shape}")
    return out


def _dense(m: int, dtype: torch.dtype, config) -> bool:
    """Multiply a dequantized temporary with cuBLAS: at large batch (compute bound), and for fp32 or fp64
    activations (the fused kernel's IEEE fp32 dot runs on CUDA cores and spills registers). A given
    ``config`` forces the fused kernel."""
    return config is None and (m >= DENSE_FROM_M or dtype not in (torch.float16, torch.bfloat16))


def _launch(kernel, grid, args, meta, config) -> None:
    """The autotuned ``kernel``, or its plain function with ``config``'s tiles."""
    if config is None:
        kernel[grid](*args, **meta)
    else:
        kernel.fn[grid](*args, **meta, **config.all_kwargs())


def _fused(kernel, a, out, weight, n: int, cols: int, tile: str, config):
    """Run ``kernel`` for out (M, n_out) = a (M, inner) against the dequantized weight tiles: split-K
    while the output tiles alone would leave the GPU idle; the autotuned tiles, or ``config``'s."""
    args, meta = weight
    m, n_out = out.shape
    bucket = _bucket(m)
    split, share = _split(triton.cdiv(m, bucket) * triton.cdiv(n_out, 64), a.shape[1], bucket, a.device)
    target = out if split == 1 else _partials((split, m, n_out), a.device)

    def grid(c):
        return triton.cdiv(m, c["BM"]), triton.cdiv(n_out, c[tile]), split

    launch = (a, target, *args, m, n, cols, a.stride(0), n_out, m * n_out, share, bucket)
    _launch(kernel, grid, launch, dict(meta, FP32_DOT=_fp32_dot(a.dtype)), config)
    if split > 1:
        out.copy_(target.sum(dim=0))
    return out


def dequantize(codes, codebook, scale, zero, *, bits: int, cols: int, block: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense (rows, cols) weight in ``dtype``, computed in fp32 as the torch path does (same bits)."""
    args, meta = _weight(codes, codebook, scale, zero, bits, cols, block)
    rows = codes.shape[0]
    w = torch.empty(rows, cols, device=codes.device, dtype=dtype)
    grid = (triton.cdiv(rows, 32), triton.cdiv(cols, 128))
    _dequantize_kernel[grid](w, *args, rows, cols, **meta, BN=32, BK=128, num_warps=4)
    return w


def forward(x2d, codes, codebook, scale, zero, *, bits: int, cols: int, block: int, out=None,
            config: triton.Config | None = None) -> torch.Tensor:
    """y (M, N) = x2d (M, K) @ dequant(Q).T, in x2d's dtype (written into ``out`` if given).

    ``config``: run the fused kernel with these tiles (one of FORWARD_CONFIGS' configs for M's bucket)
    instead of the autotuned choice, at any M.
    """
    x2d = x2d.contiguous()
    m, n = x2d.shape[0], codes.shape[0]
    out = _check(out, (m, n), x2d)
    if m == 0:
        return out
    if _dense(m, x2d.dtype, config):
        w = dequantize(codes, codebook, scale, zero, bits=bits, cols=cols, block=block, dtype=x2d.dtype)
        return torch.matmul(x2d, w.t(), out=out)
    weight = _weight(codes, codebook, scale, zero, bits, cols, block)
    return _fused(_forward_kernel, x2d, out, weight, n, cols, "BN", config)


def input_grad(dy2d, codes, codebook, scale, zero, *, bits: int, cols: int, block: int, out=None,
               config: triton.Config | None = None) -> torch.Tensor:
    """dx (M, K) = dy2d (M, N) @ dequant(Q), in dy2d's dtype (written into ``out`` if given).

    ``config``: as for :func:`forward`, from INPUT_GRAD_CONFIGS.
    """
    dy2d = dy2d.contiguous()
    m, n = dy2d.shape
    dx = _check(out, (m, cols), dy2d)
    if m == 0:
        return dx
    if _dense(m, dy2d.dtype, config):
        w = dequantize(codes, codebook, scale, zero, bits=bits, cols=cols, block=block, dtype=dy2d.dtype)
        return torch.matmul(dy2d, w, out=dx)
    weight = _weight(codes, codebook, scale, zero, bits, cols, block)
    return _fused(_input_grad_kernel, dy2d, dx, weight, n, cols, "BK", config)


def scale_grad(x2d, dy2d, codes, codebook, scale, zero, *, bits: int, cols: int, block: int,
               config: triton.Config | None = None) -> torch.Tensor:
    """dL/dscale, in scale's shape and dtype, for y = x2d (M, K) @ dequant(Q).T and dy2d = dL/dy (M, N):

        dscale[r, b] = Σ_t dy[t, r] · Σ_{c in block b} x[t, c] · (codebook[code[r, c]] − zero[r, b])

    PEQA trains only the scales; the dense dW = dyᵀx (an fp32 copy of the weight) is never built: each
    program keeps one tile of it in registers, multiplies it by the unscaled grid and sums each run of G
    columns sharing a scale into fp32 partials (rows, ≈ cols / G), which are summed per block here in a
    fixed order (deterministic, no atomics). fp16/bf16 operands: tensor-core dots with fp32 accumulation
    (the products are exact in fp32); anything else in IEEE fp32, as the torch path computes it.

    ``config``: one of SCALE_GRAD_CONFIGS' configs for M's bucket instead of the autotuned choice.
    """
    if x2d.dtype != dy2d.dtype or x2d.dtype not in (torch.float16, torch.bfloat16):
        x2d, dy2d = x2d.float(), dy2d.float()
    x2d, dy2d = x2d.contiguous(), dy2d.contiguous()
    m, rows = dy2d.shape
    args, meta = _weight(codes, codebook, scale, zero, bits, cols, block)
    g = min(meta["SCALE_G"], SCALE_GRAD_BK if config is None else config.kwargs["BK"])
    n_blocks = triton.cdiv(cols, block)
    per_block = triton.cdiv(cols, g) if n_blocks == 1 else block // g  # g divides the block when there are more
    # zeros: the columns past the last partial block's end stay 0 and are summed with it
    partials = torch.zeros(rows, n_blocks * per_block, device=x2d.device, dtype=torch.float32)

    def grid(c):
        return triton.cdiv(rows, c["BN"]), triton.cdiv(cols, c["BK"])

    launch = (x2d, dy2d, partials, *args, m, rows, cols, x2d.stride(0), dy2d.stride(0), partials.stride(0),
              _bucket(m))
    _launch(_scale_grad_kernel, grid, launch, dict(meta, FP32_DOT=_fp32_dot(x2d.dtype)), config)
    dscale = partials.view(rows, n_blocks, per_block).sum(dim=2)
    return dscale.sum_to_size(scale.shape).to(scale.dtype)
