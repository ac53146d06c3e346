"""The torch path of the dequant-matmul: unpack, look up, scale, multiply.

Used on CPU and as the reference the Triton kernels are tested against. The
dense weight is a temporary of one call: the backward pass dequantizes again
instead of keeping it alive between forward and backward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from qft.quant.packing import stream_bytes, unpack


def _grid(codes, codebook, zero, bits: int, cols: int, block: int) -> torch.Tensor:
    """codebook[code] - zero, as (rows, n_blocks, block) with the last block zero-padded."""
    return _blocks(_values(codes, codebook, bits, cols), zero, block)


def _values(codes: torch.Tensor, codebook: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """codebook[code] (rows, cols) straight from the packed words.

    Widths dividing 8 look up whole bytes in a 256-entry table of the codes each byte holds: one
    gather per byte instead of an unpack plus a gather per code.
    """
    if 8 % bits:
        q = unpack(codes, bits, cols, torch.int32)
        return codebook.index_select(0, q.reshape(-1)).view(q.shape)
    stream = stream_bytes(codes)
    shifts = torch.arange(0, 8, bits, device=codes.device)
    table = codebook[(torch.arange(256, device=codes.device)[:, None] >> shifts) & ((1 << bits) - 1)]
    return table.index_select(0, stream.reshape(-1).int()).view(stream.shape[0], -1)[:, :cols]


def _grid_unpacked(q: torch.Tensor, codebook, zero, block: int) -> torch.Tensor:
    return _blocks(codebook.index_select(0, q.reshape(-1).int()).view(q.shape), zero, block)


def _blocks(values: torch.Tensor, zero, block: int) -> torch.Tensor:
    pad = -values.shape[1] % block
    if pad:
        values = F.pad(values, (0, pad))
    values = values.reshape(values.shape[0], -1, block)
    if zero is not None:
        values = values - zero.unsqueeze(-1)
    return values


def dequantize(
    codes: torch.Tensor,
    codebook: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    *,
    bits: int,
    cols: int,
    block: int,
    dtype: torch.dtype = torch.float32,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense (rows, cols) weight: (codebook[code] - zero) * scale (+ offset), blockwise."""
    return _scaled(_grid(codes, codebook, zero, bits, cols, block), scale, cols, offset).to(dtype)


def dequantize_unpacked(
    q: torch.Tensor, codebook: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *, block: int,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """As :func:`dequantize`, from unpacked uint8 codes (rows, cols): skips packing when only values matter."""
    return _scaled(_grid_unpacked(q, codebook, zero, block), scale, q.shape[1], offset)


def _scaled(grid: torch.Tensor, scale: torch.Tensor, cols: int, offset: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight from a grid of this call's own making, scaled in place (no second buffer); an
    offset is added after the product, as llama.cpp's d·q + m (two roundings, never fused)."""
    w = grid.mul_(scale.float().unsqueeze(-1))
    if offset is not None:
        w = w.add_(offset.float().unsqueeze(-1))
    return w.reshape(w.shape[0], -1)[:, :cols]


def block_sums(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (..., cols) summed over each block of ``block`` columns (the last one may be short), in float32:
    x @ W.T of a weight constant within each (row, block) is block_sums(x) @ that constant's table .T."""
    pad = -x.shape[-1] % block
    return F.pad(x.float(), (0, pad)).unflatten(-1, (-1, block)).sum(-1)


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear computes ``x`` in: the autocast dtype where autocast is on for x's device
    (float64 and non-float tensors excepted, as autocast leaves them), else x's own."""
    kind = x.device.type
    if not x.is_floating_point() or x.dtype == torch.float64:
        return x.dtype
    if not (torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)):
        return x.dtype
    return torch.get_autocast_dtype(kind)


def autocast_off(device: torch.device):
    """A context with autocast disabled for ``device``'s type (nothing to disable where autocast
    does not exist, e.g. on the meta device). The dequant-matmul Functions compute in x's own dtype
    inside it; the dispatch has already cast x to the autocast dtype."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class DequantMatmul(torch.autograd.Function):
    """y = x @ dequantize(...).T with gradients for x and (if it trains) the scale, all in x's dtype."""

    @staticmethod
    def forward(ctx, x, scale, codes, codebook, zero, bits, cols, block):
        with autocast_off(x.device):
            w = dequantize(codes, codebook, scale, zero, bits=bits, cols=cols, block=block, dtype=x.dtype)
            y = x @ w.t()
        ctx.save_for_backward(x if scale.requires_grad else None, scale, codes, codebook, zero)
        ctx.meta = (bits, cols, block)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, scale, codes, codebook, zero = ctx.saved_tensors
        bits, cols, block = ctx.meta
        dx = dscale = None
        with autocast_off(dy.device):
            grid = _grid(codes, codebook, zero, bits, cols, block)
            if ctx.needs_input_grad[1]:  # first: it needs the grid before _scaled scales it in place
                dscale = scale_grad(x, dy, grid, scale, cols, block)
            if ctx.needs_input_grad[0]:
                dx = dy @ _scaled(grid, scale, cols).to(dy.dtype)
        return dx, dscale, None, None, None, None, None, None


def scale_grad(x, dy, grid, scale, cols: int, block: int, chunk_bytes: int = 1 << 22) -> torch.Tensor:
    """dL/dscale[r, b] = Σ_t dy[t, r] · Σ_{c in block b} x[t, c] · (codebook[code[r, c]] − zero[r, b]).

    Computed a few blocks at a time (about ``chunk_bytes`` of (blocks, tokens, rows) products each), so
    no dense out×in gradient dW = dyᵀx is ever built: PEQA-style scale training costs the memory of
    one such chunk, not of a second weight matrix in fp32.
    """
    dy2d = dy.reshape(-1, dy.shape[-1]).float()
    rows, n_blocks, _ = grid.shape
    x2d = F.pad(x.reshape(-1, cols).float(), (0, n_blocks * block - cols))
    x_blocks = x2d.view(-1, n_blocks, block).transpose(0, 1)  # (blocks, tokens, block)
    per_block = x2d.shape[0] * rows * 4
    step = max(1, chunk_bytes // max(per_block, 1))
    dscale = torch.empty(rows, n_blocks, dtype=torch.float32, device=grid.device)
    for b in range(0, n_blocks, step):
        xg = torch.bmm(x_blocks[b:b + step], grid[:, b:b + step].permute(1, 2, 0).float())  # (blocks, tokens, rows)
        dscale[:, b:b + step] = (xg * dy2d).sum(dim=1).t()
    return dscale.sum_to_size(scale.shape).to(scale.dtype)


def dequant_matmul(x, codes, codebook, scale, zero, *, bits: int, cols: int, block: int) -> torch.Tensor:
    return DequantMatmul.apply(x, scale, codes, codebook, zero, bits, cols, block)
