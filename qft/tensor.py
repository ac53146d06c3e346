"""QuantizedTensor: a weight matrix as packed codes + stored scales + its format.

The object holds exactly the tensors that would be written to disk, so
``nbytes`` is the true storage cost (a 2-bit matrix takes a quarter byte per
weight plus its scales), and ``to_tensors`` / ``from_tensors`` give a flat,
self-describing dict for safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qft.formats import Format, get_format
from qft.kernels import dequantize as dequantize_codes
from qft.packing import pack, words_per_row


def _encode_name(name: str) -> torch.Tensor:
    return torch.tensor(list(name.encode("ascii")), dtype=torch.uint8)


def _decode_name(t: torch.Tensor) -> str:
    return bytes(t.tolist()).decode("ascii")


@dataclass
class QuantizedTensor:
    format: Format
    shape: tuple[int, int]
    codes: torch.Tensor  # int32 (rows, words_per_row(cols, bits)), qft.packing layout
    tensors: dict[str, torch.Tensor]  # the format's stored scale tensors

    @classmethod
    def quantize(cls, w: torch.Tensor, format: str | Format) -> QuantizedTensor:
        """Quantize a 2-D float weight (out_features, in_features) in ``format``."""
        fmt = get_format(format)
        codes, tensors = fmt.quantize(w)
        return cls(fmt, tuple(w.shape), pack(codes, fmt.bits), tensors)

    @classmethod
    def empty(cls, format: str | Format, shape: tuple[int, int], device=None) -> QuantizedTensor:
        """A zero-filled tensor of the right layout, to be filled by loading a checkpoint."""
        fmt = get_format(format)
        rows, cols = shape
        codes = torch.zeros(rows, words_per_row(cols, fmt.bits), dtype=torch.int32, device=device)
        tensors = {n: torch.zeros(s, dtype=d, device=device) for n, (s, d) in fmt.stored_layout(rows, cols).items()}
        return cls(fmt, (rows, cols), codes, tensors)

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def block(self) -> int:
        return self.format.block_size(self.rows, self.cols)

    def scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoded float32 (scale, zero) per block; zero is None for symmetric formats."""
        return self.format.decode_scales(self.tensors, self.rows, self.cols)

    def codebook(self) -> torch.Tensor:
        return self.format.codebook().to(self.codes.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale, zero = self.scales()
        return dequantize_codes(
            self.codes, self.codebook(), scale, zero,
            bits=self.format.bits, cols=self.cols, block=self.block, dtype=dtype,
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the codes and stored scales (shape and format name not counted)."""
        return sum(t.numel() * t.element_size() for t in [self.codes, *self.tensors.values()])

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat dict for safetensors; ``shape`` and ``format`` are tensors too."""
        return {
            "codes": self.codes,
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "format": _encode_name(self.format.name),
            **self.tensors,
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
        """Rebuild from :meth:`to_tensors`, checking that every piece is there and fits."""
        missing = {"codes", "shape", "format"} - tensors.keys()
        if missing:
            raise ValueError(f"not a qft QuantizedTensor: missing {sorted(missing)}")
        fmt = get_format(_decode_name(tensors["format"]))
        rows, cols = (int(v) for v in tensors["shape"].tolist())
        rest = {k: v for k, v in tensors.items() if k not in ("codes", "shape", "format")}
        codes = tensors["codes"]
        expected = (rows, words_per_row(cols, fmt.bits))
        if tuple(codes.shape) != expected or codes.dtype != torch.int32:
            raise ValueError(
                f"codes of a {rows}x{cols} {fmt.name} tensor must be int32 {expected}, "
                f"got {codes.dtype} {tuple(codes.shape)}"
            )
        layout = fmt.stored_layout(rows, cols)
        if rest.keys() != layout.keys():
            raise ValueError(f"a {rows}x{cols} {fmt.name} tensor stores {sorted(layout)}, got {sorted(rest)}")
        for name, (shape, dtype) in layout.items():
            if tuple(rest[name].shape) != shape or rest[name].dtype != dtype:
                raise ValueError(
                    f"{name} of a {rows}x{cols} {fmt.name} tensor must be {dtype} {shape}, "
                    f"got {rest[name].dtype} {tuple(rest[name].shape)}"
                )
        qt = cls(fmt, (rows, cols), codes, rest)
        return qt

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor({self.format.name}, shape={self.shape}, "
            f"{self.bits_per_param:.3f} bits/param, {self.nbytes} bytes)"
        )
