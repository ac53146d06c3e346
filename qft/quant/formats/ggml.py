"""llama.cpp's symmetric block formats (Q8_0, Q4_0, Q5_0, Q6_K, Q3_K) as qft formats, bit-exact with ggml.

A ggml type fits qft only where its own dequantization is qft's one formula
``codebook[code] * scale`` (no zero) computed with the same float32 operations,
so a weight exported to GGUF means exactly what it meant while it trained:

- Q8_0, Q4_0, Q5_0: blocks of 32 weights, one fp16 ``d``; value = d * q with q an
  int8, q - 8 (4-bit) or q - 16 (5-bit). qft stores ``d`` as ``scale`` (rows, cols/32) fp16.
- Q6_K, Q3_K: super-blocks of 256 with one fp16 ``d`` and 16 sub-block scales
  ``sc`` (int8, or 6 bits stored as sc + 32); value = (d * sc) * q with q 6-bit
  minus 32 or 3-bit in -4..3. ggml forms d * sc in float32 first (exact: an fp16
  times a small integer), so ``decode_scales`` returns that same product and qft's
  blocks are the 16-weight sub-blocks. qft stores ``d`` (rows, cols/256) fp16 and
  ``sub_scales``, the values sc + 2**(k-1) packed k bits each per row.

Codes are q + 2**(bits-1) (so the codebook is ``arange(2**bits) - 2**(bits-1)``);
Q3_K's code is its 2 low bits plus its hmask bit as bit 2 (ggml's q is the low
bits minus 4 where that bit is unset: code - 4 either way). The asymmetric types
(Q4_1, Q5_1, Q2_K, Q4_K, Q5_K: value = d * q - m) are not here because they need an additive offset term that
qft's ``(codebook - zero) * scale`` kernels cannot reproduce bit for bit.

Scales follow llama.cpp's reference quantizers: Q8_0 d = amax / 127; Q4_0 and
Q5_0 map the signed value of largest magnitude onto -8 (-16), so d (and the K
types' d * sc) may be negative. For the K types each sub-block first gets the float scale of least
squared error (a search over where its extreme lands, as llama.cpp's
make_qx_quants does, but unweighted, then alternating refits), the
super-block's ``d`` maps the largest sub-scale onto the most negative integer
sub-scale, and each integer sub-scale is whichever neighbour of its ideal value
rounds the sub-block with less error. Codes are always rounded to nearest
against the stored (fp16-rounded) grid where llama.cpp rounds against the
unrounded scale, so a few codes differ from its quantizer's, never for the
worse. ggml stores whole blocks only: a row length that is not a multiple of 32
(256 for K types) is a ValueError.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qft.quant.formats.base import Format, check_weight
from qft.quant.packing import pack, unpack, words_per_row

if TYPE_CHECKING:
    from qft.quant.tensor import QuantizedTensor

logger = logging.getLogger(__name__)

SUB_BLOCK = 16  # weights per sub-block scale in the K types


@dataclass(frozen=True)
class _Field:
    """Where ``width`` bits of each element (taken from bit ``low`` of its value) live in a ggml
    block: byte ``at + byte[e]``, shifted left by ``shift[e]``."""

    at: int
    low: int
    width: int
    byte: tuple[int, ...]
    shift: tuple[int, ...]


def _field(at: int, low: int, width: int, n: int, byte, shift) -> _Field:
    return _Field(at, low, width, tuple(byte(e) for e in range(n)), tuple(shift(e) for e in range(n)))


@dataclass(frozen=True)
class _Spec:
    """One ggml type's grid and byte layout."""

    qtype: GGMLQuantizationType
    bits: int  # code width
    d_at: int  # byte offset of the fp16 d
    codes: tuple[_Field, ...]
    code_xor: int = 0  # stored byte = code ^ code_xor (Q8_0 stores int8 q = code - 128)
    signed_max: bool = True  # d maps the signed extreme onto -2**(bits-1) (else amax onto 2**(bits-1) - 1)
    sub_bits: int = 0  # K types: width of an integer sub-scale (0: no sub-scales)
    sub_scales: tuple[_Field, ...] = ()
    sub_xor: int = 0  # stored = (sc + 2**(sub_bits-1)) ^ sub_xor (Q6_K stores int8 sc)

    @property
    def block(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def offset(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def scale_block(self) -> int:
        return SUB_BLOCK if self.sub_bits else self.block


_NIBBLES_32 = dict(byte=lambda e: e % 16, shift=lambda e: 4 * (e // 16))  # q[j] | q[j + 16] << 4
_QUARTERS_256 = dict(byte=lambda e: e // 128 * 32 + e % 32, shift=lambda e: 2 * (e % 128 // 32))

_SPECS: dict[str, _Spec] = {
    "q8_0": _Spec(
        GGMLQuantizationType.Q8_0, bits=8, d_at=0, code_xor=0x80, signed_max=False,
        codes=(_field(2, 0, 8, 32, lambda e: e, lambda e: 0),),
    ),
    "q4_0": _Spec(
        GGMLQuantizationType.Q4_0, bits=4, d_at=0, codes=(_field(2, 0, 4, 32, **_NIBBLES_32),),
    ),
    "q5_0": _Spec(
        GGMLQuantizationType.Q5_0, bits=5, d_at=0,
        codes=(
            _field(6, 0, 4, 32, **_NIBBLES_32),
            _field(2, 4, 1, 32, lambda e: e // 8, lambda e: e % 8),  # qh: bit e of a little-endian uint32
        ),
    ),
    "q6_k": _Spec(
        GGMLQuantizationType.Q6_K, bits=6, d_at=208,
        codes=(
            _field(0, 0, 4, 256, lambda e: e // 128 * 64 + e % 64, lambda e: 4 * (e % 128 // 64)),  # ql
            _field(128, 4, 2, 256, **_QUARTERS_256),  # qh
        ),
        sub_bits=8, sub_xor=0x80, sub_scales=(_field(192, 0, 8, 16, lambda k: k, lambda k: 0),),
    ),
    "q3_k": _Spec(
        GGMLQuantizationType.Q3_K, bits=3, d_at=108,
        codes=(
            _field(32, 0, 2, 256, **_QUARTERS_256),  # qs
            _field(0, 2, 1, 256, lambda e: e % 32, lambda e: e // 32),  # hmask
        ),
        sub_bits=6,
        sub_scales=(
            _field(96, 0, 4, 16, lambda k: k % 8, lambda k: 4 * (k // 8)),
            _field(96, 4, 2, 16, lambda k: 8 + k % 4, lambda k: 2 * (k // 4)),
        ),
    ),
}

GGML_TYPES: dict[str, GGMLQuantizationType] = {name: spec.qtype for name, spec in _SPECS.items()}
"""qft format name -> the ggml type it is bit-exact with."""

_BY_QTYPE = {spec.qtype: name for name, spec in _SPECS.items()}


@dataclass(frozen=True, eq=False)
class GGMLFormat(Format):
    """One of llama.cpp's symmetric block formats, by qft name (``"q4_0"``, ``"q6_k"``, ...)."""

    kind: str = "q4_0"

    def __post_init__(self) -> None:
        if self.kind not in _SPECS:
            raise ValueError(f"unknown ggml format {self.kind!r}; choose one of {list(_SPECS)}")

    @property
    def spec(self) -> _Spec:
        return _SPECS[self.kind]

    @property
    def bits(self) -> int:  # type: ignore[override]
        return self.spec.bits

    @property
    def name(self) -> str:
        return self.kind

    @property
    def qtype(self) -> GGMLQuantizationType:
        return self.spec.qtype

    def codebook(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.arange(1 << self.bits, dtype=torch.float32, device=device) - self.spec.offset

    def block_size(self, rows: int, cols: int) -> int:
        return self.spec.scale_block

    def fits(self, rows: int, cols: int) -> bool:
        return cols % self.spec.block == 0

    def check_shape(self, rows: int, cols: int) -> None:
        """ggml stores whole blocks: a row length that is not a multiple of one is a ValueError."""
        block = self.spec.block
        if self.fits(rows, cols):
            return
        if cols % 32 == 0:
            other = "'q8_0', 'q5_0' or 'q4_0' (blocks of 32)"
        else:
            other = "'int4-g128' or 'nf4' (their last block may be short; they do not export to GGUF)"
        raise ValueError(
            f"{self.name} stores rows in whole blocks of {block} weights, so the row length (in_features) "
            f"must be a multiple of {block}; this weight is {rows}x{cols}. Use another format for it, "
            f"e.g. {other}"
        )

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        w = check_weight(w).contiguous()  # sums in one memory order: the same codes for any strides
        rows, cols = w.shape
        self.check_shape(rows, cols)
        spec = self.spec
        if spec.sub_bits:
            return self._quantize_k(w)
        blocks = w.reshape(rows, cols // spec.block, spec.block)
        if spec.signed_max:
            d = _signed_extreme(blocks) / -spec.offset
        else:
            d = blocks.abs().amax(dim=-1) / (spec.offset - 1)
        d16 = self._fp16(d, blocks)
        q = _round(blocks, d16.float(), spec.offset)
        return (q + spec.offset).to(torch.uint8).view(rows, cols), {"scale": d16.contiguous()}

    def _quantize_k(self, w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        spec = self.spec
        rows, cols = w.shape
        sub = w.reshape(rows, cols // SUB_BLOCK, SUB_BLOCK)
        ideal = _least_squares_scales(sub, spec.offset)  # (rows, n_sub)
        per_super = spec.block // SUB_BLOCK
        half = 1 << (spec.sub_bits - 1)
        d16 = self._fp16(_signed_extreme(ideal.view(rows, -1, per_super)) / -half, w)
        d = d16.float().repeat_interleave(per_super, dim=1)
        # the integer sub-scale: whichever neighbour of ideal / d rounds its sub-block with less error
        ratio = ideal / torch.where(d != 0, d, torch.ones_like(d))
        low = ratio.floor().clamp(-half, half - 1)
        high = (low + 1).clamp(-half, half - 1)
        errors = [_rtn_error(sub, d * sc, spec.offset) for sc in (low, high)]
        sc = torch.where(errors[1] < errors[0], high, low)
        sc = torch.where(d != 0, sc, torch.zeros_like(sc))
        q = _round(sub, d * sc, spec.offset)
        codes = (q + spec.offset).to(torch.uint8).view(rows, cols)
        stored = (sc + half).to(torch.uint8)
        return codes, {"d": d16.contiguous(), "sub_scales": pack(stored, spec.sub_bits)}

    def _fp16(self, d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        d16 = d.to(torch.float16)
        if not torch.isfinite(d16).all():
            raise ValueError(
                f"{self.name} stores its scales in fp16, but this weight (largest magnitude "
                f"{float(w.abs().max()):.6g}) needs a scale beyond fp16's max {torch.finfo(torch.float16).max:.6g}; "
                "rescale the weight, or use an NF or FP8 format (e.g. 'nf4', 'fp8'), whose scales are fp32"
            )
        return d16

    def decode_scales(self, tensors: dict[str, torch.Tensor], rows: int, cols: int) -> tuple[torch.Tensor, None]:
        spec = self.spec
        if not spec.sub_bits:
            return tensors["scale"].float(), None
        n_sub = self.n_blocks(rows, cols)
        sc = unpack(tensors["sub_scales"], spec.sub_bits, n_sub, torch.int32) - (1 << (spec.sub_bits - 1))
        d = tensors["d"].float().repeat_interleave(spec.block // SUB_BLOCK, dim=1)[:, :n_sub]
        return d * sc.float(), None  # ggml's d * sc, in float32

    def stored_layout(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        spec = self.spec
        if not spec.sub_bits:
            return {"scale": ((rows, self.n_blocks(rows, cols)), torch.float16)}
        return {
            "d": ((rows, -(-cols // spec.block)), torch.float16),
            "sub_scales": ((rows, words_per_row(self.n_blocks(rows, cols), spec.sub_bits)), torch.int32),
        }

    def nominal_bits(self, rows: int, cols: int) -> float:
        return self.spec.type_size * 8 / self.spec.block


def _signed_extreme(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude along the last dim, sign kept (the first one on ties)."""
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)


def _round(x: torch.Tensor, scale: torch.Tensor, offset: int) -> torch.Tensor:
    """Integer q in [-offset, offset) nearest to x / scale per block of x (..., n); 0 where scale is 0."""
    safe = torch.where(scale != 0, scale, torch.full_like(scale, float("inf"))).unsqueeze(-1)
    return torch.round(x / safe).clamp_(-offset, offset - 1).add_(0.0)  # x / inf: 0 (the + 0.0 turns -0 into +0)


def _rtn_error(x: torch.Tensor, scale: torch.Tensor, offset: int) -> torch.Tensor:
    return (x - _round(x, scale, offset) * scale.unsqueeze(-1)).square().sum(dim=-1)


def _least_squares_scales(x: torch.Tensor, offset: int, refits: int = 3) -> torch.Tensor:
    """A float scale per sub-block of x (..., n) with small sum of (x - s * q)^2, q = round(x / s)
    clamped to [-offset, offset).

    Tries mapping the extreme onto 0.7 to 1.2 times level -offset or offset - 1 (the negative end
    has one level more; mapping inside the grid clips the extreme, which pays off for a lone
    outlier), refits s by least squares for each, keeps the best, then alternates rounding and
    refitting, which never increases the error.
    """
    extreme = _signed_extreme(x)
    safe = torch.where(extreme != 0, extreme, torch.ones_like(extreme))
    reach = [0.7 + 0.05 * i for i in range(11)]
    targets = [-offset * r for r in reach] + [(offset - 1) * r for r in reach]
    best = torch.zeros_like(extreme)
    best_gain = torch.full_like(extreme, -1.0)
    for target in targets:
        scale, gain = _refit(x, safe / target, offset)
        better = gain > best_gain
        best = torch.where(better, scale, best)
        best_gain = torch.where(better, gain, best_gain)
    for _ in range(refits):
        scale, gain = _refit(x, best, offset)
        better = gain > best_gain
        best = torch.where(better, scale, best)
        best_gain = torch.where(better, gain, best_gain)
    return torch.where(extreme != 0, best, torch.zeros_like(best))


def _refit(x: torch.Tensor, scale: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round x against ``scale``, then the least-squares scale for those q and the error it removes
    (sum(xq)^2 / sum(q^2); the error is sum(x^2) minus it)."""
    q = _round(x, scale, offset)
    xq = (x * q).sum(dim=-1)
    qq = q.square().sum(dim=-1)
    ok = qq > 0
    qq = torch.where(ok, qq, torch.ones_like(qq))
    return torch.where(ok, xq / qq, scale), torch.where(ok, xq * xq / qq, torch.zeros_like(xq))


def is_ggml(format: str | Format) -> bool:
    """Whether ``format`` (a name or a Format) is one of the ggml formats, which export to GGUF as they are."""
    if isinstance(format, Format):
        return isinstance(format, GGMLFormat)
    return isinstance(format, str) and format.strip().lower() in _SPECS


def _put(out: torch.Tensor, values: torch.Tensor, fields: Sequence[_Field]) -> None:
    """OR each field of ``values`` (n_blocks, n) into the int32 block bytes ``out`` (n_blocks, type_size)."""
    for f in fields:
        byte = torch.tensor(f.byte) + f.at
        shift = torch.tensor(f.shift, dtype=torch.int32)
        part = ((values >> f.low) & ((1 << f.width) - 1)) << shift
        out.index_add_(1, byte, part)  # fields never share bits: adding is OR-ing


def _get(blocks: torch.Tensor, fields: Sequence[_Field]) -> torch.Tensor:
    """The values (n_blocks, n) whose fields the int32 block bytes ``blocks`` hold."""
    values = None
    for f in fields:
        byte = torch.tensor(f.byte) + f.at
        shift = torch.tensor(f.shift, dtype=torch.int32)
        part = ((blocks[:, byte] >> shift) & ((1 << f.width) - 1)) << f.low
        values = part if values is None else values | part
    return values


def _as_fp16(t: torch.Tensor, what: str) -> torch.Tensor:
    """A stored fp16 tensor as fp16; a trained one (kept in fp32) is rounded, with a warning if that changes it."""
    t = t.detach().cpu()
    half = t.to(torch.float16)
    if t.dtype != torch.float16 and not torch.equal(half.to(t.dtype), t):
        changed = int((half.to(t.dtype) != t).sum())
        logger.warning("GGUF stores %s in fp16: rounding %d of %d trained values", what, changed, t.numel())
    return half


def to_ggml(qt: QuantizedTensor) -> tuple[np.ndarray, GGMLQuantizationType]:
    """The bytes a GGUF file stores for ``qt`` (uint8, (rows, bytes_per_row)) and their ggml type: what
    ``gguf.quants.dequantize`` reads and ``GGUFWriter.add_tensor(name, data, raw_dtype=qtype)`` writes."""
    fmt = qt.format
    if not isinstance(fmt, GGMLFormat):
        raise ValueError(
            f"to_ggml needs a weight in a ggml format ({', '.join(_SPECS)}), got {fmt.name}; "
            "quantize it with QuantizedTensor.quantize(w, 'q4_0') (or another of them) first"
        )
    if getattr(qt, "shard_of", None) is not None:
        raise ValueError("to_ggml needs the whole weight, not an FSDP shard of it; gather it first")
    spec = fmt.spec
    rows, cols = qt.shape
    fmt.check_shape(rows, cols)
    n_blocks = rows * cols // spec.block
    codes = unpack(qt.codes.detach().cpu(), spec.bits, cols, torch.int32).reshape(n_blocks, spec.block)
    out = torch.zeros(n_blocks, spec.type_size, dtype=torch.int32)
    _put(out, codes ^ spec.code_xor, spec.codes)
    tensors = qt.tensors
    if spec.sub_bits:
        n_sub = cols // SUB_BLOCK
        sc = unpack(tensors["sub_scales"].detach().cpu(), spec.sub_bits, n_sub, torch.int32)
        _put(out, sc.reshape(n_blocks, -1) ^ spec.sub_xor, spec.sub_scales)
        d = _as_fp16(tensors["d"], "d")
    else:
        d = _as_fp16(tensors["scale"], "scale")
    data = out.to(torch.uint8).numpy()
    data[:, spec.d_at:spec.d_at + 2] = d.numpy().astype("<f2").reshape(-1, 1).view(np.uint8)
    return data.reshape(rows, -1), spec.qtype


def from_ggml(data: np.ndarray, qtype: GGMLQuantizationType | int | str, shape: Sequence[int]) -> QuantizedTensor:
    """A GGUF tensor's bytes as a QuantizedTensor (the inverse of :func:`to_ggml`).

    ``shape`` is (rows, cols) in torch order (out_features, in_features): reversed
    ``ReaderTensor.shape`` of ``gguf.GGUFReader``.
    """
    from qft.quant.tensor import QuantizedTensor

    if isinstance(qtype, str):
        qtype = GGMLQuantizationType[qtype.strip().upper()]
    qtype = GGMLQuantizationType(qtype)
    if qtype not in _BY_QTYPE:
        raise ValueError(
            f"{qtype.name} has no qft format; qft reads {', '.join(t.name for t in _BY_QTYPE)} "
            "(the asymmetric types need an offset term qft's formula has no room for)"
        )
    fmt = GGMLFormat(_BY_QTYPE[qtype])
    spec = fmt.spec
    if len(shape) != 2:
        raise ValueError(f"from_ggml reads 2-D weights (rows, cols), got shape {tuple(shape)}")
    rows, cols = (int(s) for s in shape)
    fmt.check_shape(rows, cols)
    raw = np.ascontiguousarray(data)
    if raw.dtype != np.uint8:
        raise ValueError(f"ggml blocks are bytes: expected a uint8 array, got {raw.dtype}")
    n_blocks = rows * cols // spec.block
    if raw.size != n_blocks * spec.type_size:
        raise ValueError(
            f"a {rows}x{cols} {qtype.name} tensor is {n_blocks * spec.type_size} bytes, got {raw.size}"
        )
    raw = raw.reshape(n_blocks, spec.type_size)
    blocks = torch.from_numpy(raw.astype(np.int32))
    codes = (_get(blocks, spec.codes) ^ spec.code_xor).reshape(rows, cols)
    d = torch.from_numpy(raw[:, spec.d_at:spec.d_at + 2].copy().view("<f2").astype(np.float16))
    d = d.reshape(rows, -1)
    if spec.sub_bits:
        sc = (_get(blocks, spec.sub_scales) ^ spec.sub_xor).reshape(rows, -1)
        tensors = {"d": d, "sub_scales": pack(sc, spec.sub_bits)}
    else:
        tensors = {"scale": d}
    return QuantizedTensor(fmt, (rows, cols), pack(codes, spec.bits), tensors, torch.float32)
