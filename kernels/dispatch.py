"""Dequant-matmul kernels and the one dispatch QLinear calls.

``qft.kernels`` is a namespace package (no ``__init__.py``, so the repository root
never shadows Hugging Face's ``kernels``; docs/DESIGN.md, Layout). Knows nothing
of models or formats: it takes packed codes (qft.quant.packing layout), a codebook,
blockwise scales and optional zero-points.

Backends: ``"triton"`` (kernels/triton_dequant.py: forward, input-gradient and,
for trainable scales, scale-gradient kernels; CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``) and ``"torch"`` (unpack + lookup + matmul; CPU and the
reference). ``"auto"`` (the default) takes Triton for CUDA tensors and
torch otherwise. Force one with the ``backend`` argument or the
``QFT_KERNEL_BACKEND`` environment variable.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from qft.kernels import torch_path
from qft.kernels.torch_path import autocast_dtype, autocast_off, block_sums, dequantize
from torch.autograd.function import once_differentiable

__all__ = ["BACKENDS", "dequant_matmul", "dequantize", "resolve_backend"]

BACKENDS = ("auto", "torch", "triton")


def _triton_usable(device: torch.device) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend a call on ``device`` uses: the argument, else $QFT_KERNEL_BACKEND, else auto."""
    choice = backend or os.environ.get("QFT_KERNEL_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"unknown kernel backend {choice!r}; choose one of {list(BACKENDS)}")
    if choice == "auto":
        return "triton" if device.type == "cuda" and _triton_usable(device) else "torch"
    if choice == "triton" and not _triton_usable(device):
        raise ValueError(
            f"the triton backend needs CUDA tensors and the triton package (got a {device.type} tensor); "
            "use backend='torch', or set TRITON_INTERPRET=1 to run the kernels on CPU for testing"
        )
    return choice


class _TritonDequantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, codes, codebook, zero, bits, cols, block):
        from qft.kernels import triton_dequant

        x2d = x.reshape(-1, cols).contiguous()
        with autocast_off(x.device):
            y = triton_dequant.forward(x2d, codes, codebook, scale, zero, bits=bits, cols=cols, block=block)
        ctx.save_for_backward(x if scale.requires_grad else None, scale, codes, codebook, zero)
        ctx.meta = (bits, cols, block)
        return y.reshape(*x.shape[:-1], codes.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        from qft.kernels import triton_dequant

        x, scale, codes, codebook, zero = ctx.saved_tensors
        bits, cols, block = ctx.meta
        dx = dscale = None
        dy2d = dy.reshape(-1, dy.shape[-1]).contiguous()
        with autocast_off(dy.device):
            if ctx.needs_input_grad[0]:
                dx = triton_dequant.input_grad(dy2d, codes, codebook, scale, zero, bits=bits, cols=cols, block=block)
                dx = dx.reshape(*dy.shape[:-1], cols)
            if ctx.needs_input_grad[1]:  # trainable scales: dW = dyᵀx only tile by tile, in the kernel's registers
                dscale = triton_dequant.scale_grad(x.reshape(-1, cols), dy2d, codes, codebook, scale, zero,
                                                   bits=bits, cols=cols, block=block)
        return dx, dscale, None, None, None, None, None, None


def _check_devices(x: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(
                f"{name} is on {t.device} but x is on {x.device}; move the quantized weight to x's device "
                "(e.g. layer.to(x.device)) before the matmul"
            )


def dequant_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebook: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    *,
    bits: int,
    cols: int,
    block: int,
    backend: str | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ W.T for W = (codebook[code] - zero) * scale (+ offset), from the packed codes.

    An offset (rows, n_blocks), constant within each block (llama.cpp's d·q + m), adds
    block_sums(x) @ offset.T: a matmul over n_blocks = cols / block columns, on any backend.

    Autocast is honoured as nn.Linear honours it: when autocast is on for x's device, x is cast
    to the autocast dtype first, and both backends compute in that dtype (fp32 accumulation) and
    return y in it; the gradient for x is computed in it too (autograd casts it back to x's own
    dtype). Without autocast y is in x's dtype.
    """
    _check_devices(x, codes=codes, codebook=codebook, scale=scale, zero=zero, offset=offset)
    x = x.to(autocast_dtype(x))
    if resolve_backend(x.device, backend) == "triton":
        y = _TritonDequantMatmul.apply(x, scale, codes, codebook, zero, bits, cols, block)
    else:
        y = torch_path.dequant_matmul(x, codes, codebook, scale, zero, bits=bits, cols=cols, block=block)
    if offset is not None:
        y = y + (block_sums(x, block) @ offset.float().t()).to(y.dtype)
    return y
