"""What every number format provides, and the checks they share.

Every qft format stores a weight matrix W (rows = output features, cols = input
features) as k-bit codes plus per-block scales, and dequantizes as

    W[r, c] = (codebook[code[r, c]] - zero[r, b]) * scale[r, b] (+ offset[r, b]),   b = c // block

with ``zero`` absent (0) for the symmetric formats, and ``offset`` only for the formats that store
a float minimum per block (llama.cpp's Q4_1, Q4_K, ...: d·q + m, added after the product). One
formula for all formats keeps the dequant-matmul kernels format-agnostic: a format only decides
how the codes are chosen and how ``scale``, ``zero`` and ``offset`` are stored.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from qft.kernels.torch_path import dequantize_unpacked
from qft.quant.packing import words_per_row


class Format(ABC):
    """A number format: quantize a 2-D weight, decode its scales, count its bits."""

    bits: int  # width of one code

    @property
    @abstractmethod
    def name(self) -> str:
        """Canonical name; ``qft.quant.formats.get_format(name)`` rebuilds the format."""

    @abstractmethod
    def codebook(self, device: torch.device | str | None = None) -> torch.Tensor:
        """float32 tensor of 2**bits values on ``device``: what each code means before scaling."""

    @abstractmethod
    def block_size(self, rows: int, cols: int) -> int:
        """Length of one scale block along the input dimension."""

    @abstractmethod
    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return uint8 codes of w's shape and the tensors that store the scales."""

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """dequantize(quantize(w)) as float32, without packing the codes (when only the values matter)."""
        codes, tensors = self.quantize(w)
        scale, zero = self.decode_scales(tensors, *w.shape)
        return dequantize_unpacked(codes, self.codebook(w.device), scale, zero, block=self.block_size(*w.shape),
                                   offset=self.decode_offset(tensors, *w.shape))

    @abstractmethod
    def decode_scales(
        self, tensors: dict[str, torch.Tensor], rows: int, cols: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float32 ``scale`` and ``zero`` (or None), each (rows or 1, n_blocks)."""

    def decode_offset(self, tensors: dict[str, torch.Tensor], rows: int, cols: int) -> torch.Tensor | None:
        """float32 ``offset`` (rows, n_blocks) added after the scaling, or None (every format but d·q + m ones)."""
        return None

    @abstractmethod
    def stored_layout(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each stored scale tensor (everything except the codes)."""

    @abstractmethod
    def nominal_bits(self, rows: int, cols: int) -> float:
        """Textbook bits per parameter (e.g. k + 32/B0), without padding."""

    def storage_bits(self, rows: int, cols: int) -> int:
        """Exact bits this format occupies for a (rows, cols) matrix, padding included."""
        scale_bits = sum(
            math.prod(shape) * dtype.itemsize * 8 for shape, dtype in self.stored_layout(rows, cols).values()
        )
        return rows * words_per_row(cols, self.bits) * 32 + scale_bits

    def fits(self, rows: int, cols: int) -> bool:
        """Whether this format can hold a (rows, cols) matrix at all (ggml's types need whole blocks)."""
        return True

    def n_blocks(self, rows: int, cols: int) -> int:
        return -(-cols // self.block_size(rows, cols))

    def __repr__(self) -> str:
        return f"Format({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Format) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


def check_weight(w: torch.Tensor) -> torch.Tensor:
    """Validate a weight matrix and return it as float32."""
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor weight, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(
            f"expected a 2-D weight (out_features, in_features), got shape {tuple(w.shape)}; "
            "reshape it (e.g. w.flatten(1)) before quantizing"
        )
    if not w.dtype.is_floating_point:
        raise ValueError(f"expected a floating-point weight, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty weight of shape {tuple(w.shape)}")
    w = w.detach().float()
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(
            f"weight of shape {tuple(w.shape)} holds {bad} NaN or Inf values; "
            "fix the checkpoint (or the training run that produced it) before quantizing"
        )
    return w


def to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """(rows, cols) -> (rows, n_blocks, block), zero-padding the last block of each row."""
    rows, cols = w.shape
    pad = -cols % block
    return F.pad(w, (0, pad)).view(rows, -1, block)


def from_blocks(blocks: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`to_blocks`."""
    return blocks.reshape(blocks.shape[0], -1)[:, :cols]


def check_choice(what: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"unsupported {what} {value!r}; choose one of {list(allowed)}")
