"""Dequant-matmul kernels and the one dispatch QLinear calls.

Installed as ``qft.kernels`` (never as a top-level ``kernels``). Knows nothing
of models or formats: it takes packed codes (qft.packing layout), a codebook,
blockwise scales and optional zero-points.

Backends: ``"torch"`` (unpack + lookup + matmul; CPU and reference). Choose with
the ``backend`` argument or the ``QFT_KERNEL_BACKEND`` environment variable;
``"auto"`` (the default) picks the best backend available for the tensors' device.
"""

from __future__ import annotations

import os

import torch

from qft.kernels import torch_path
from qft.kernels.torch_path import dequantize

__all__ = ["BACKENDS", "dequant_matmul", "dequantize", "resolve_backend"]

BACKENDS = ("auto", "torch")


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend a call on ``device`` uses: the argument, else $QFT_KERNEL_BACKEND, else auto."""
    choice = backend or os.environ.get("QFT_KERNEL_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"unknown kernel backend {choice!r}; choose one of {list(BACKENDS)}")
    return "torch"


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
) -> torch.Tensor:
    """y = x @ W.T for W = (codebook[code] - zero) * scale, from the packed codes."""
    resolve_backend(x.device, backend)
    return torch_path.dequant_matmul(x, codes, codebook, scale, zero, bits=bits, cols=cols, block=block)
