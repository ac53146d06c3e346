"""Uniform asymmetric int-k, round to nearest, scale and zero-point per group.

Each group of ``group_size`` weights along a row (or the whole row, per
channel) gets scale = (max - min) / (2**k - 1) over a range widened to include
0, stored in fp16 (rounded up, so the grid still spans the range; a group whose
scale would exceed fp16's max is a ValueError), and an integer zero-point in
[0, 2**k) stored in k bits (all of a matrix's zero-points packed as one bit
stream). W = (code - zero) * scale. This is the layout of compressed-tensors'
``weight_packed / weight_scale / weight_zero_point`` and what PEQA trains
(the scales) on top of frozen codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qft.quant.formats.base import Format, check_choice, check_weight, from_blocks, to_blocks
from qft.quant.packing import pack, unpack, words_per_row

INT_BITS = (2, 3, 4, 5, 6, 7, 8)
INT_GROUPS = (16, 32, 64, 128, 256, None)  # None: one group per output channel
SCALE_DTYPE = torch.float16


@dataclass(frozen=True, eq=False)
class UniformInt(Format):
    bits: int = 4
    group_size: int | None = 128

    def __post_init__(self) -> None:
        check_choice("int bit width", self.bits, INT_BITS)
        check_choice("int group size (None = per channel)", self.group_size, INT_GROUPS)

    @property
    def name(self) -> str:
        return f"int{self.bits}-" + ("ch" if self.group_size is None else f"g{self.group_size}")

    def codebook(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.arange(1 << self.bits, dtype=torch.float32, device=device)

    def block_size(self, rows: int, cols: int) -> int:
        return cols if self.group_size is None else self.group_size

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        w = check_weight(w)
        rows, cols = w.shape
        top = (1 << self.bits) - 1
        blocks = to_blocks(w, self.block_size(rows, cols))
        low = blocks.amin(dim=-1).clamp(max=0)
        high = blocks.amax(dim=-1).clamp(min=0)
        exact = (high - low) / top
        fp16_max = torch.finfo(SCALE_DTYPE).max
        if exact.max() > fp16_max:  # the fp16 scale would be inf, the weights NaN
            raise ValueError(
                f"{self.name} stores scales in fp16, so a group may span at most {fp16_max * top:.6g} "
                f"(fp16's max {fp16_max:.6g} x {top} steps), but a group of this weight spans "
                f"{float((high - low).max()):.6g}; rescale the weight, or use an NF or FP8 format "
                "(e.g. 'nf4', 'fp8'), whose scales are fp32"
            )
        # Round the stored scale up, so the grid still spans [low, high] and nothing clips.
        scale = exact.to(SCALE_DTYPE)
        scale = torch.where(scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        s = scale.float()
        zero = torch.round(-low / s).clamp(0, top)
        codes = (torch.round(blocks / s.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, top)
        codes = from_blocks(codes.to(torch.uint8), cols)
        return codes, {"scale": scale.contiguous(), "zero": pack(zero.to(torch.uint8).reshape(1, -1), self.bits)}

    def decode_scales(
        self, tensors: dict[str, torch.Tensor], rows: int, cols: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_blocks = self.n_blocks(rows, cols)
        zero = unpack(tensors["zero"], self.bits, rows * n_blocks).float()
        return tensors["scale"].float(), zero.reshape(rows, n_blocks)

    def stored_layout(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        n_blocks = self.n_blocks(rows, cols)
        return {
            "scale": ((rows, n_blocks), SCALE_DTYPE),
            "zero": ((1, words_per_row(rows * n_blocks, self.bits)), torch.int32),
        }

    def nominal_bits(self, rows: int, cols: int) -> float:
        return self.bits + (16 + self.bits) / self.block_size(rows, cols)
