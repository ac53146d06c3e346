"""NormalFloat-k: quantiles of N(0, 1) as a codebook, blockwise absmax scales.

The codebook follows QLoRA (bitsandbytes' ``create_normal_map``): 2**(k-1)
positive and 2**(k-1) - 1 negative normal quantiles plus an exact zero,
normalized to [-1, 1]. For k = 4 it equals bitsandbytes' NF4 bit for bit.

Scales are the absmax of each block of ``block`` weights along a row
(rows whose length is not a multiple of the block end in a shorter block).
They are stored either as fp32 (bitsandbytes with ``compress_statistics=False``)
or, as in LQ-LoRA, double-quantized: the flattened scales are cut into blocks
of ``scale_block`` values, each block keeps its maximum m in fp16 or fp32, and
each scale becomes a ``scale_bits``-bit code i meaning m * (i + 1) / 2**scale_bits
(never zero, so no block is wiped out). Weight codes are chosen against the
stored (double-quantized) scale, so the rounding is to the grid that is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from scipy.stats import norm

from qft.quant.formats.base import Format, check_choice, check_weight, from_blocks, to_blocks
from qft.quant.packing import pack, unpack, words_per_row

NF_BITS = (2, 3, 4, 8)
NF_BLOCKS = (16, 32, 64)
SCALE_BITS = (2, 3, 4, 8)
SCALE_BLOCKS = (16, 64, 256)
SECOND_LEVEL_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@lru_cache(maxsize=None)
def _normal_codebook(bits: int) -> tuple[float, ...]:
    n = 1 << bits
    # bitsandbytes' offset for NF4 is 0.9677083 = mean of 1 - 1/(2*15) and 1 - 1/(2*16).
    offset = 0.9677083 if bits == 4 else 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))
    half = n // 2
    positive = norm.ppf(torch.linspace(offset, 0.5, half + 1)[:-1].numpy()).tolist()
    negative = (-norm.ppf(torch.linspace(offset, 0.5, half)[:-1].numpy())).tolist()
    values = torch.tensor(positive + [0.0] + negative, dtype=torch.float32).sort().values
    values /= values.max()
    return tuple(values.tolist())


def nf_codebook(bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The NormalFloat-k codebook on ``device``, sorted ascending, in [-1, 1] with an exact 0."""
    check_choice("NormalFloat bit width", bits, NF_BITS)
    return torch.tensor(_normal_codebook(bits), dtype=torch.float32, device=device)


def nf_midpoints(bits: int) -> torch.Tensor:
    """Midpoints between neighbouring codebook values: the rounding thresholds."""
    book = nf_codebook(bits)
    return (book[1:] + book[:-1]) / 2


@lru_cache(maxsize=None)
def _rounding_tables(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For ``nearest_code``: a uniform grid of ``cells`` over [-1, 1] (plus one cell for exactly 1),
    each cell's first candidate code and the one threshold that can lie in it (+inf if none).

    A value's computed cell may be off by float rounding (< 2**-23 after clamping); cells are made
    narrow enough that even widened by ``margin`` each holds at most one threshold, so one
    comparison against it finishes the rounding exactly.
    """
    thresholds = nf_midpoints(bits)
    mids = thresholds.double()
    margin = 1e-6
    cells = 64
    while True:
        edges = torch.linspace(-1, 1, cells + 1, dtype=torch.float64)
        first = torch.searchsorted(mids, edges - margin)  # thresholds surely below every value of the cell
        last = torch.searchsorted(mids, edges + 2 / cells + margin, right=True)
        if int((last - first).max()) <= 1:
            break
        cells *= 2
    thresholds = torch.cat([thresholds, torch.tensor([float("inf")])])[first]
    return first.to(torch.int32).to(device), thresholds.to(device), cells


def nearest_code(x: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 index of the nearest NF-``bits`` value (ties to the lower one) for each element of float32 ``x``.

    Equals ``torch.bucketize(x, nf_midpoints(bits))`` bit for bit, several times faster on CPU (a
    binary search per element there, against two table look-ups and one comparison here). Values
    beyond [-1, 1] round to the end codes, so they are clamped first.
    """
    first, thresholds, cells = _rounding_tables(bits, x.device)
    clamped = x.clamp(-1, 1)
    cell = clamped.add(1).mul_(cells // 2).to(torch.int32).reshape(-1)  # x may be a strided view
    codes = first.index_select(0, cell).view(x.shape)
    return codes.add_(clamped > thresholds.index_select(0, cell).view(x.shape))


@dataclass(frozen=True, eq=False)
class NormalFloat(Format):
    bits: int = 4
    block: int = 64
    scale_bits: int | None = None  # None: fp32 scales; else double quantization
    scale_block: int = 256
    second_level: str = "fp32"

    def __post_init__(self) -> None:
        check_choice("NormalFloat bit width", self.bits, NF_BITS)
        check_choice("NormalFloat block size", self.block, NF_BLOCKS)
        if self.scale_bits is not None:
            check_choice("scale bit width", self.scale_bits, SCALE_BITS)
            check_choice("scale block size", self.scale_block, SCALE_BLOCKS)
            check_choice("second-level scale dtype", self.second_level, tuple(SECOND_LEVEL_DTYPES))

    @property
    def double_quantized(self) -> bool:
        return self.scale_bits is not None

    @property
    def name(self) -> str:
        name = f"nf{self.bits}-b{self.block}"
        if self.double_quantized:
            name += f"-dq{self.scale_bits}b{self.scale_block}"
            if self.second_level != "fp32":
                name += f"-{self.second_level}"
        return name

    def codebook(self, device: torch.device | str | None = None) -> torch.Tensor:
        return nf_codebook(self.bits, device)

    def block_size(self, rows: int, cols: int) -> int:
        return self.block

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        w = check_weight(w)
        blocks = to_blocks(w, self.block)
        absmax = blocks.abs().amax(dim=-1)
        if self.double_quantized:
            codes, block_max = self._double_quantize(absmax)
            scale = self._decode(codes, block_max).reshape(absmax.shape)
            tensors = {"scale_codes": pack(codes, self.scale_bits), "scale_max": block_max}
        else:
            scale, tensors = absmax, {"scale": absmax.contiguous()}
        return from_blocks(self._codes(blocks, scale).to(torch.uint8), w.shape[1]), tensors

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        w = check_weight(w)
        blocks = to_blocks(w, self.block)
        scale = self.stored_scale(blocks.abs().amax(dim=-1))
        return from_blocks(self.fake_quantize_blocks(blocks, scale), w.shape[1])

    def stored_scale(self, absmax: torch.Tensor) -> torch.Tensor:
        """The scale ``decode_scales`` returns for blocks of this ``absmax`` (rows, n_blocks),
        computed directly: the scale codes are never packed and unpacked."""
        if not self.double_quantized:
            return absmax
        return self._decode(*self._double_quantize(absmax)).reshape(absmax.shape)

    def fake_quantize_blocks(self, blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The dequantized values of ``blocks`` (rows, n_blocks, block) rounded against their stored ``scale``.

        The error table calls it with the absmax and stored scale shared across formats.
        """
        codes = self._codes(blocks, scale).view(-1)
        values = self.codebook(blocks.device).index_select(0, codes).view(blocks.shape)
        return values.mul_(scale.unsqueeze(-1))

    def _codes(self, blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        return nearest_code(blocks / safe.unsqueeze(-1), self.bits)

    def _double_quantize(self, absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 scale codes (1, n) and each scale block's maximum (n_scale_blocks,) as stored."""
        flat = absmax.reshape(1, -1)
        block_max = to_blocks(flat, self.scale_block).amax(dim=-1)  # (1, n_scale_blocks)
        block_max = block_max.to(SECOND_LEVEL_DTYPES[self.second_level]).reshape(-1)
        levels = 1 << self.scale_bits
        safe_max = self._per_scale(block_max, flat.shape[1])
        safe_max = torch.where(safe_max > 0, safe_max, torch.ones_like(safe_max))
        codes = torch.round(flat / safe_max * levels) - 1
        return codes.clamp(0, levels - 1).to(torch.uint8), block_max

    def _per_scale(self, block_max: torch.Tensor, n: int) -> torch.Tensor:
        return block_max.float().repeat_interleave(self.scale_block)[:n]

    def _decode(self, codes: torch.Tensor, block_max: torch.Tensor) -> torch.Tensor:
        n = codes.numel()
        return (codes.reshape(-1).float() + 1) / (1 << self.scale_bits) * self._per_scale(block_max, n)

    def decode_scales(
        self, tensors: dict[str, torch.Tensor], rows: int, cols: int
    ) -> tuple[torch.Tensor, None]:
        n_blocks = self.n_blocks(rows, cols)
        if not self.double_quantized:
            return tensors["scale"].float(), None
        codes = unpack(tensors["scale_codes"], self.scale_bits, rows * n_blocks)
        return self._decode(codes, tensors["scale_max"]).reshape(rows, n_blocks), None

    def stored_layout(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        n = rows * self.n_blocks(rows, cols)
        if not self.double_quantized:
            return {"scale": ((rows, self.n_blocks(rows, cols)), torch.float32)}
        return {
            "scale_codes": ((1, words_per_row(n, self.scale_bits)), torch.int32),
            "scale_max": ((-(-n // self.scale_block),), SECOND_LEVEL_DTYPES[self.second_level]),
        }

    def nominal_bits(self, rows: int, cols: int) -> float:
        if not self.double_quantized:
            return self.bits + 32 / self.block
        second = 16 if self.second_level == "fp16" else 32
        return self.bits + self.scale_bits / self.block + second / (self.block * self.scale_block)
