"""Triton fast Walsh–Hadamard transform of each row (a power of two up to 2¹⁵), normalised.

One program per row: the row is loaded into registers once, the log2(n) butterfly stages run
there (stage h pairs element i with i + h inside blocks of 2h), the row is stored once. fp32
arithmetic whatever the input dtype; the output dtype is the caller's.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _fwht_kernel(x_ptr, y_ptr, scale, N: tl.constexpr, LOG_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, N)
    x = tl.load(x_ptr + row * N + offsets).to(tl.float32)
    for stage in tl.static_range(LOG_N):
        # blocks of 2h: (n / 2h, 2, h) → pair the two halves of each block
        pairs = tl.permute(tl.reshape(x, (N >> (stage + 1), 2, 1 << stage)), (0, 2, 1))
        a, b = tl.split(pairs)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (N,))
    tl.store(y_ptr + row * N + offsets, (x * scale).to(y_ptr.dtype.element_ty))


def num_warps(n: int) -> int:
    """Warps per row: enough lanes that each holds at most 64 fp32 values of the row."""
    return max(1, min(16, n // (32 * 64)))


def fwht(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (rows, n) contiguous, n a power of two: x @ H_n / √n, in ``dtype`` (default x's)."""
    rows, n = x.shape
    if n & (n - 1) or n > 1 << 15:
        raise ValueError(f"the Triton transform takes a power of two up to 32768 per row, got {n}")
    y = torch.empty_like(x, dtype=dtype or x.dtype)
    if rows and n > 1:
        _fwht_kernel[(rows,)](x, y, 1 / math.sqrt(n), N=n, LOG_N=n.bit_length() - 1, num_warps=num_warps(n))
    elif rows:
        y.copy_(x)
    return y
