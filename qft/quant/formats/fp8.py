"""FP8 E4M3 / E5M2 with a per-tensor or per-row fp32 scale (for HALO).

The scale maps the largest magnitude onto the format's largest finite value,
then torch's round-to-nearest-even cast picks the code. The codebook is the
256 values the bit patterns mean (E4M3's two NaN patterns are never produced).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qft.kernels.low_precision import FP8_FORMATS, symmetric_cast
from qft.quant.formats.base import Format, check_choice, check_weight

FP8_SCALING = ("row", "tensor")


@dataclass(frozen=True, eq=False)
class FP8(Format):
    kind: str = "e4m3"
    scaling: str = "row"
    bits: int = 8

    def __post_init__(self) -> None:
        check_choice("FP8 kind", self.kind, tuple(FP8_FORMATS))
        check_choice("FP8 scaling", self.scaling, FP8_SCALING)
        if self.bits != 8:
            raise ValueError(f"FP8 codes are 8 bits wide, got bits={self.bits}")

    @property
    def dtype(self) -> torch.dtype:
        return FP8_FORMATS[self.kind]

    @property
    def name(self) -> str:
        return f"fp8-{self.kind}-{self.scaling}"

    def codebook(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.arange(256, dtype=torch.int32, device=device).to(torch.uint8).view(self.dtype).float()

    def block_size(self, rows: int, cols: int) -> int:
        return cols

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        codes, scale = symmetric_cast(check_weight(w), self.dtype, per_row=self.scaling == "row")
        return codes.view(torch.uint8), {"scale": scale.reshape(-1, 1)}  # per tensor: (1, 1)

    def decode_scales(
        self, tensors: dict[str, torch.Tensor], rows: int, cols: int
    ) -> tuple[torch.Tensor, None]:
        return tensors["scale"].float(), None

    def stored_layout(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"scale": (((rows, 1) if self.scaling == "row" else (1, 1)), torch.float32)}

    def nominal_bits(self, rows: int, cols: int) -> float:
        return 8 + 32 * (rows if self.scaling == "row" else 1) / (rows * cols)
