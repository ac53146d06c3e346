"""llama.cpp's block formats as qft formats, bit-exact with ggml: the symmetric Q8_0, Q4_0, Q5_0, Q6_K,
Q3_K and the asymmetric Q4_1, Q5_1, Q2_K, Q4_K, Q5_K.

A ggml type fits qft where its own dequantization is qft's formula ``codebook[code] * scale + offset``
(no zero) computed with the same float32 operations, so a weight exported to GGUF means exactly
what it meant while it trained.

Symmetric types (value = d * q; no offset):

- Q8_0, Q4_0, Q5_0: blocks of 32 weights, one fp16 ``d``; value = d * q with q an
  int8, q - 8 (4-bit) or q - 16 (5-bit). qft stores ``d`` as ``scale`` (rows, cols/32) fp16.
- Q6_K, Q3_K: super-blocks of 256 with one fp16 ``d`` and 16 sub-block scales
  ``sc`` (int8, or 6 bits stored as sc + 32); value = (d * sc) * q with q 6-bit
  minus 32 or 3-bit in -4..3. ggml forms d * sc in float32 first (exact: an fp16
  times a small integer), so ``decode_scales`` returns that same product and qft's
  blocks are the 16-weight sub-blocks. qft stores ``d`` (rows, cols/256) fp16 and
  ``sub_scales``, the values sc + 2**(k-1) packed k bits each per row.

Their codes are q + 2**(bits-1) (so the codebook is ``arange(2**bits) - 2**(bits-1)``);
Q3_K's code is its 2 low bits plus its hmask bit as bit 2 (ggml's q is the low
bits minus 4 where that bit is unset: code - 4 either way).

Asymmetric types (codes are ggml's unsigned q itself, codebook ``arange(2**bits)``, and a float32
offset per block that qft adds after the product, in a second rounding, as ggml does):

- Q4_1, Q5_1: blocks of 32 with fp16 ``d`` and ``m``; value = (d * q) + m, q 4 or 5 bits.
  qft stores ``scale`` (d) and ``m``, each (rows, cols/32) fp16; ``decode_offset`` is m, and
  ``encode_offset`` writes any float offset back into m (rounded to fp16).
- Q4_K, Q5_K (sub-blocks of 32) and Q2_K (sub-blocks of 16): super-blocks of 256 with fp16 ``d``
  and ``dmin`` and per sub-block unsigned integers ``sc`` and ``m`` (6 bits; 4 for Q2_K); value =
  (d * sc) * q - (dmin * m), both products in float32 (exact). ``decode_scales`` returns d * sc and
  ``decode_offset`` -(dmin * m): x - y is x + (-y) exactly in IEEE arithmetic, so qft's result is
  ggml's bit for bit. qft stores ``d`` and ``dmin`` (rows, cols/256) fp16 and ``sub_scales``: each
  row's sc values followed by its m values, packed k bits each (exactly ggml's bits per weight).

Scales follow llama.cpp's reference quantizers: Q8_0 d = amax / 127; Q4_0 and
Q5_0 map the signed value of largest magnitude onto -8 (-16), so d (and the symmetric K
types' d * sc) may be negative; Q4_1 and Q5_1 take the block's min as m and (max - min) /
(2**bits - 1) as d. For the K types each sub-block first gets the float scale (and, asymmetric,
the float min, never above 0) of least squared error: a search over where its extreme lands, or how
many steps its range spans, as llama.cpp's make_qx_quants and make_qkx2_quants do but unweighted,
then alternating refits. The super-block's ``d`` maps the largest sub-scale onto the extreme
integer sub-scale (``dmin`` the largest -min onto the largest integer m), and each integer
sub-scale (and m) is whichever neighbour of its ideal value rounds the sub-block with less error.
Codes are always rounded to nearest against the stored (fp16-rounded) grid where llama.cpp rounds
against the unrounded scale (and min), so a few codes differ from its quantizer's, never for the
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

SUB_BLOCK = 16  # weights per sub-block scale in the symmetric K types (and Q2_K)


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
    sub_block: int = SUB_BLOCK  # K types: weights per sub-block
    m_at: int | None = None  # asymmetric types: byte offset of the fp16 m (Q4_1, Q5_1) or dmin (K types)
    sub_mins: tuple[_Field, ...] = ()  # asymmetric K types: where the integer m of each sub-block lives

    @property
    def block(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def asymmetric(self) -> bool:
        """value = d * q + m (an offset per block) rather than d * q."""
        return self.m_at is not None

    @property
    def shift(self) -> int:
        """code - q: 2**(bits-1) for the symmetric types (q is signed), 0 for the asymmetric ones."""
        return 0 if self.asymmetric else 1 << (self.bits - 1)

    @property
    def top(self) -> int:
        """The largest code."""
        return (1 << self.bits) - 1

    @property
    def scale_block(self) -> int:
        return self.sub_block if self.sub_bits else self.block

    @property
    def per_super(self) -> int:
        """Sub-blocks per super-block (K types)."""
        return self.block // self.sub_block


_NIBBLES_32 = dict(byte=lambda e: e % 16, shift=lambda e: 4 * (e // 16))  # q[j] | q[j + 16] << 4
_QUARTERS_256 = dict(byte=lambda e: e // 128 * 32 + e % 32, shift=lambda e: 2 * (e % 128 // 32))
_HIGH_BIT_32 = dict(byte=lambda e: e // 8, shift=lambda e: e % 8)  # qh: bit e of a little-endian uint32
# Q4_K / Q5_K: 64 weights per 32 bytes, the first 32 in the low nibbles
_NIBBLES_64 = dict(byte=lambda e: e // 64 * 32 + e % 32, shift=lambda e: 4 * (e % 64 // 32))
# Q4_K / Q5_K's 12 bytes of 6-bit sc and m (8 each): sc k < 4 in byte k and m k < 4 in byte 4 + k (6 low
# bits); for k >= 4 the low 4 bits are the low (sc) or high (m) nibble of byte 8 + k - 4 and the high 2
# bits are the top 2 bits of byte k - 4 (sc) or k (m)
_K_SCALES = (
    _field(4, 0, 4, 8, lambda k: k if k < 4 else k + 4, lambda k: 0),
    _field(4, 4, 2, 8, lambda k: k if k < 4 else k - 4, lambda k: 4 if k < 4 else 6),
)
_K_MINS = (
    _field(4, 0, 4, 8, lambda k: 4 + k if k < 4 else k + 4, lambda k: 0 if k < 4 else 4),
    _field(4, 4, 2, 8, lambda k: 4 + k if k < 4 else k, lambda k: 4 if k < 4 else 6),
)

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
        codes=(_field(6, 0, 4, 32, **_NIBBLES_32), _field(2, 4, 1, 32, **_HIGH_BIT_32)),
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
    "q4_1": _Spec(
        GGMLQuantizationType.Q4_1, bits=4, d_at=0, m_at=2, codes=(_field(4, 0, 4, 32, **_NIBBLES_32),),
    ),
    "q5_1": _Spec(
        GGMLQuantizationType.Q5_1, bits=5, d_at=0, m_at=2,
        codes=(_field(8, 0, 4, 32, **_NIBBLES_32), _field(4, 4, 1, 32, **_HIGH_BIT_32)),
    ),
    "q2_k": _Spec(
        GGMLQuantizationType.Q2_K, bits=2, d_at=80, m_at=82,
        codes=(_field(16, 0, 2, 256, **_QUARTERS_256),),
        sub_bits=4,
        sub_scales=(_field(0, 0, 4, 16, lambda k: k, lambda k: 0),),  # byte k = sc | m << 4
        sub_mins=(_field(0, 0, 4, 16, lambda k: k, lambda k: 4),),
    ),
    "q4_k": _Spec(
        GGMLQuantizationType.Q4_K, bits=4, d_at=0, m_at=2, sub_block=32,
        codes=(_field(16, 0, 4, 256, **_NIBBLES_64),),
        sub_bits=6, sub_scales=_K_SCALES, sub_mins=_K_MINS,
    ),
    "q5_k": _Spec(
        GGMLQuantizationType.Q5_K, bits=5, d_at=0, m_at=2, sub_block=32,
        codes=(
            _field(48, 0, 4, 256, **_NIBBLES_64),  # qs
            _field(16, 4, 1, 256, lambda e: e % 32, lambda e: e // 32),  # qh: bit (sub-block) of byte j
        ),
        sub_bits=6, sub_scales=_K_SCALES, sub_mins=_K_MINS,
    ),
}

GGML_TYPES: dict[str, GGMLQuantizationType] = {name: spec.qtype for name, spec in _SPECS.items()}
"""qft format name -> the ggml type it is bit-exact with."""

_BY_QTYPE = {spec.qtype: name for name, spec in _SPECS.items()}


@dataclass(frozen=True, eq=False)
class GGMLFormat(Format):
    """One of llama.cpp's block formats, by qft name (``"q4_0"``, ``"q4_k"``, ...)."""

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

    @property
    def asymmetric(self) -> bool:
        """Whether values carry an offset per block (d * q + m: Q4_1, Q5_1, Q2_K, Q4_K, Q5_K)."""
        return self.spec.asymmetric

    def codebook(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.arange(1 << self.bits, dtype=torch.float32, device=device) - self.spec.shift

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
            other = "'q8_0', 'q5_1', 'q5_0', 'q4_1' or 'q4_0' (blocks of 32)"
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
            return self._quantize_k_min(w) if spec.asymmetric else self._quantize_k(w)
        blocks = w.reshape(rows, cols // spec.block, spec.block)
        if spec.asymmetric:  # llama.cpp's Q4_1 / Q5_1: m = min, d = (max - min) / top
            low = blocks.amin(dim=-1)
            d16 = self._fp16((blocks.amax(dim=-1) - low) / spec.top, w)
            m16 = self._fp16(low, w)
            q = _round_from(blocks, d16.float(), m16.float(), spec.top)
            return q.to(torch.uint8).view(rows, cols), {"scale": d16.contiguous(), "m": m16.contiguous()}
        if spec.signed_max:
            d = _signed_extreme(blocks) / -spec.shift
        else:
            d = blocks.abs().amax(dim=-1) / (spec.shift - 1)
        d16 = self._fp16(d, blocks)
        q = _round(blocks, d16.float(), spec.shift)
        return (q + spec.shift).to(torch.uint8).view(rows, cols), {"scale": d16.contiguous()}

    def _quantize_k(self, w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        spec = self.spec
        rows, cols = w.shape
        sub = w.reshape(rows, cols // spec.sub_block, spec.sub_block)
        ideal = _least_squares_scales(sub, spec.shift)  # (rows, n_sub)
        per_super = spec.per_super
        half = 1 << (spec.sub_bits - 1)
        d16 = self._fp16(_signed_extreme(ideal.view(rows, -1, per_super)) / -half, w)
        d = d16.float().repeat_interleave(per_super, dim=1)
        # the integer sub-scale: whichever neighbour of ideal / d rounds its sub-block with less error
        ratio = ideal / torch.where(d != 0, d, torch.ones_like(d))
        low = ratio.floor().clamp(-half, half - 1)
        high = (low + 1).clamp(-half, half - 1)
        errors = [_rtn_error(sub, d * sc, spec.shift) for sc in (low, high)]
        sc = torch.where(errors[1] < errors[0], high, low)
        sc = torch.where(d != 0, sc, torch.zeros_like(sc))
        q = _round(sub, d * sc, spec.shift)
        codes = (q + spec.shift).to(torch.uint8).view(rows, cols)
        stored = (sc + half).to(torch.uint8)
        return codes, {"d": d16.contiguous(), "sub_scales": pack(stored, spec.sub_bits)}

    def _quantize_k_min(self, w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Q2_K, Q4_K, Q5_K: a float scale and min per sub-block, then d and dmin per super-block
        and the integer sc and m per sub-block on them."""
        spec = self.spec
        rows, cols = w.shape
        per_super, levels = spec.per_super, (1 << spec.sub_bits) - 1
        sub = w.reshape(rows, cols // spec.sub_block, spec.sub_block)
        scale, low = _least_squares_scale_min(sub, spec.top)  # (rows, n_sub): scale >= 0 >= low
        d16 = self._fp16(scale.view(rows, -1, per_super).amax(dim=-1) / levels, w)
        dmin16 = self._fp16(low.neg().add(0.0).view(rows, -1, per_super).amax(dim=-1) / levels, w)
        d = d16.float().repeat_interleave(per_super, dim=1)
        dmin = dmin16.float().repeat_interleave(per_super, dim=1)
        # the integer sc and m: whichever neighbours of scale / d and -low / dmin round the sub-block best
        scs, ms = _neighbours(scale, d, levels), _neighbours(low.neg(), dmin, levels)
        pairs = [(sc, m) for sc in scs for m in ms]
        errors = torch.stack([_rtn_error_from(sub, d * sc, -(dmin * m), spec.top) for sc, m in pairs])
        pick = errors.argmin(dim=0)  # the first of equals: the smaller sc, then the smaller m
        sc = torch.stack([sc for sc, _ in pairs]).gather(0, pick.unsqueeze(0)).squeeze(0)
        m = torch.stack([m for _, m in pairs]).gather(0, pick.unsqueeze(0)).squeeze(0)
        q = _round_from(sub, d * sc, -(dmin * m), spec.top)
        stored = torch.cat([sc, m], dim=1).to(torch.uint8)
        return q.to(torch.uint8).view(rows, cols), {
            "d": d16.contiguous(), "dmin": dmin16.contiguous(), "sub_scales": pack(stored, spec.sub_bits),
        }

    def _fp16(self, d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        d16 = d.to(torch.float16)
        if not torch.isfinite(d16).all():
            raise ValueError(
                f"{self.name} stores its scales (and offsets) in fp16, but this weight (largest magnitude "
                f"{float(w.abs().max()):.6g}) needs one beyond fp16's max {torch.finfo(torch.float16).max:.6g}; "
                "rescale the weight, or use an NF or FP8 format (e.g. 'nf4', 'fp8'), whose scales are fp32"
            )
        return d16

    def _sub_values(self, tensors: dict[str, torch.Tensor], rows: int, cols: int) -> tuple[torch.Tensor, int]:
        """The K types' stored integer sub-scales (then, asymmetric, the mins) as int32, and n_sub."""
        spec = self.spec
        n_sub = self.n_blocks(rows, cols)
        count = 2 * n_sub if spec.asymmetric else n_sub
        return unpack(tensors["sub_scales"], spec.sub_bits, count, torch.int32), n_sub

    def _per_sub(self, t: torch.Tensor, n_sub: int) -> torch.Tensor:
        """A per-super-block fp16 tensor (d, dmin) as float32, one value per sub-block."""
        return t.float().repeat_interleave(self.spec.per_super, dim=1)[:, :n_sub]

    def decode_scales(self, tensors: dict[str, torch.Tensor], rows: int, cols: int) -> tuple[torch.Tensor, None]:
        spec = self.spec
        if not spec.sub_bits:
            return tensors["scale"].float(), None
        values, n_sub = self._sub_values(tensors, rows, cols)
        sc = values[:, :n_sub] if spec.asymmetric else values - (1 << (spec.sub_bits - 1))
        return self._per_sub(tensors["d"], n_sub) * sc.float(), None  # ggml's d * sc, in float32

    def decode_offset(self, tensors: dict[str, torch.Tensor], rows: int, cols: int) -> torch.Tensor | None:
        """Q4_1, Q5_1: m; the asymmetric K types: -(dmin * m), ggml's product negated (exact); others: None."""
        spec = self.spec
        if not spec.asymmetric:
            return None
        if not spec.sub_bits:
            return tensors["m"].float()
        values, n_sub = self._sub_values(tensors, rows, cols)
        return -(self._per_sub(tensors["dmin"], n_sub) * values[:, n_sub:].float())

    def encode_offset(self, tensors: dict[str, torch.Tensor], offset: torch.Tensor, rows: int,
                      cols: int) -> dict[str, torch.Tensor]:
        """``tensors`` with the offset per block replaced by ``offset`` (rows, n_blocks), rounded to the fp16
        ggml stores, so that ``decode_offset`` of the result is ``offset.half().float()``.

        Only Q4_1 and Q5_1 store a free float offset (their fp16 m); for the others this is a ValueError.
        """
        spec = self.spec
        if not spec.asymmetric:
            raise ValueError(
                f"{self.name} has no offset to set (its value is d * q); of the ggml types only 'q4_1' and "
                "'q5_1' store a free float offset per block"
            )
        if spec.sub_bits:
            raise ValueError(
                f"{self.name}'s offset is -dmin * m: one fp16 dmin per {spec.block} weights times an integer m "
                f"({spec.sub_bits} bits) per sub-block of {spec.sub_block}, not a free float per block, so an "
                "arbitrary offset cannot be stored exactly; only 'q4_1' and 'q5_1' store one (an fp16 m per 32 weights)"
            )
        shape = (rows, self.n_blocks(rows, cols))
        if not isinstance(offset, torch.Tensor) or tuple(offset.shape) != shape:
            got = tuple(offset.shape) if isinstance(offset, torch.Tensor) else type(offset).__name__
            raise ValueError(f"{self.name} stores one offset per block: expected shape {shape}, got {got}")
        m = offset.detach().to(device=tensors["m"].device, dtype=torch.float32).to(torch.float16)
        if not torch.isfinite(m).all():
            bad = int((~torch.isfinite(m)).sum())
            raise ValueError(
                f"{bad} of the offsets are NaN or Inf once rounded to the fp16 m {self.name} stores "
                f"(fp16's max is {torch.finfo(torch.float16).max:.6g})"
            )
        return {**tensors, "m": m.contiguous()}

    def stored_layout(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        spec = self.spec
        if not spec.sub_bits:
            per_block = ((rows, self.n_blocks(rows, cols)), torch.float16)
            return {"scale": per_block, "m": per_block} if spec.asymmetric else {"scale": per_block}
        per_super = ((rows, -(-cols // spec.block)), torch.float16)
        layout = {"d": per_super, "dmin": per_super} if spec.asymmetric else {"d": per_super}
        count = self.n_blocks(rows, cols) * (2 if spec.asymmetric else 1)
        layout["sub_scales"] = ((rows, words_per_row(count, spec.sub_bits)), torch.int32)
        return layout

    def nominal_bits(self, rows: int, cols: int) -> float:
        return self.spec.type_size * 8 / self.spec.block


def _signed_extreme(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude along the last dim, sign kept (the first one on ties)."""
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)


def _round(x: torch.Tensor, scale: torch.Tensor, shift: int) -> torch.Tensor:
    """Integer q in [-shift, shift) nearest to x / scale per block of x (..., n); 0 where scale is 0."""
    safe = torch.where(scale != 0, scale, torch.full_like(scale, float("inf"))).unsqueeze(-1)
    return torch.round(x / safe).clamp_(-shift, shift - 1).add_(0.0)  # x / inf: 0 (the + 0.0 turns -0 into +0)


def _rtn_error(x: torch.Tensor, scale: torch.Tensor, shift: int) -> torch.Tensor:
    return (x - _round(x, scale, shift) * scale.unsqueeze(-1)).square().sum(dim=-1)


def _round_from(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, top: int) -> torch.Tensor:
    """Integer q in [0, top] nearest to (x - offset) / scale per block of x (..., n), in the float32
    operations GPTQ rounds with; 0 where scale is 0."""
    safe = torch.where(scale != 0, scale, torch.full_like(scale, float("inf"))).unsqueeze(-1)
    return torch.round((x - offset.unsqueeze(-1)) / safe).clamp_(0, top).add_(0.0)


def _rtn_error_from(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, top: int) -> torch.Tensor:
    """Squared error of rounding x (..., n) onto q * scale + offset (as qft and ggml dequantize), per block."""
    q = _round_from(x, scale, offset, top)
    diff = x - (q * scale.unsqueeze(-1) + offset.unsqueeze(-1))
    return _dot(diff, diff)


def _neighbours(value: torch.Tensor, unit: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The integers in [0, levels] just below and above value / unit (both 0 where unit is 0)."""
    nonzero = unit != 0
    ratio = value / torch.where(nonzero, unit, torch.ones_like(unit))
    below = ratio.floor().clamp(0, levels)
    above = (below + 1).clamp(0, levels)
    zero = torch.zeros_like(below)
    return torch.where(nonzero, below, zero), torch.where(nonzero, above, zero)


def _least_squares_scales(x: torch.Tensor, shift: int, refits: int = 3) -> torch.Tensor:
    """A float scale per sub-block of x (..., n) with small sum of (x - s * q)^2, q = round(x / s)
    clamped to [-shift, shift).

    Tries mapping the extreme onto 0.7 to 1.2 times level -shift or shift - 1 (the negative end
    has one level more; mapping inside the grid clips the extreme, which pays off for a lone
    outlier), refits s by least squares for each, keeps the best, then alternates rounding and
    refitting, which never increases the error.
    """
    extreme = _signed_extreme(x)
    safe = torch.where(extreme != 0, extreme, torch.ones_like(extreme))
    reach = [0.7 + 0.05 * i for i in range(11)]
    targets = [-shift * r for r in reach] + [(shift - 1) * r for r in reach]
    best = torch.zeros_like(extreme)
    best_gain = torch.full_like(extreme, -1.0)
    for target in targets:
        scale, gain = _refit(x, safe / target, shift)
        better = gain > best_gain
        best = torch.where(better, scale, best)
        best_gain = torch.where(better, gain, best_gain)
    for _ in range(refits):
        scale, gain = _refit(x, best, shift)
        better = gain > best_gain
        best = torch.where(better, scale, best)
        best_gain = torch.where(better, gain, best_gain)
    return torch.where(extreme != 0, best, torch.zeros_like(best))


def _refit(x: torch.Tensor, scale: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round x against ``scale``, then the least-squares scale for those q and the error it removes
    (sum(xq)^2 / sum(q^2); the error is sum(x^2) minus it)."""
    q = _round(x, scale, shift)
    xq = (x * q).sum(dim=-1)
    qq = q.square().sum(dim=-1)
    ok = qq > 0
    qq = torch.where(ok, qq, torch.ones_like(qq))
    return torch.where(ok, xq / qq, scale), torch.where(ok, xq * xq / qq, torch.zeros_like(xq))


def _least_squares_scale_min(x: torch.Tensor, top: int, refits: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A float scale >= 0 and min <= 0 per sub-block of x (..., n) with small sum of
    (x - (scale * q + min))^2, q = round((x - min) / scale) clamped to [0, top].

    As llama.cpp's make_qkx2_quants but unweighted: the range [min(x, 0), max(x)] is cut into
    top - 1 to top + 1 steps (in tenths), each cut's q get the least-squares scale and min (the min
    held at 0 where it would be positive: ggml's m is unsigned), and the fit of least error for its
    q is kept; then rounding on the fit and refitting alternate, keeping only what lowers the error.
    """
    low = x.amin(dim=-1).clamp(max=0.0)
    span = x.amax(dim=-1) - low
    flat = span == 0  # every value equal (and <= 0): scale 0, min that value
    safe_span = torch.where(flat, torch.ones_like(span), span).unsqueeze(-1)
    shifted = x - low.unsqueeze(-1)
    sx, sxx = x.sum(dim=-1).double(), x.square().sum(dim=-1).double()
    best_scale, best_min = span / top, low
    best_error = torch.full_like(sx, float("inf"))
    for i in range(-10, 11):
        q = torch.round(shifted * ((top + 0.1 * i) / safe_span)).clamp_(0, top)
        sums = _sums(x, q, sx, sxx)
        candidates = [_fit_scale_min(*sums)] + ([(best_scale.double(), best_min.double())] if i == 0 else [])
        for scale, minimum in candidates:  # (at the plain cut into top steps, its own scale and min too)
            error = _fixed_q_error(scale, minimum, *sums)
            better = error < best_error
            best_scale = torch.where(better, scale.float(), best_scale)
            best_min = torch.where(better, minimum.float(), best_min)
            best_error = torch.where(better, error, best_error)
    best_error = _rtn_error_from(x, best_scale, best_min, top)  # from here on: the error after rounding
    for _ in range(refits):
        scale, minimum = _fit_scale_min(*_sums(x, _round_from(x, best_scale, best_min, top), sx, sxx))
        scale, minimum = scale.float(), minimum.float()
        error = _rtn_error_from(x, scale, minimum, top)
        better = error < best_error
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, minimum, best_min)
        best_error = torch.where(better, error, best_error)
    return torch.where(flat, torch.zeros_like(best_scale), best_scale).add_(0.0), torch.where(flat, low, best_min)


def _sums(x: torch.Tensor, q: torch.Tensor, sx: torch.Tensor, sxx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """n and the sums of q, q^2, x, x^2 and x q per block of x (..., n), in float64 (those of q exact)."""
    return (float(x.shape[-1]), q.sum(dim=-1).double(), _dot(q, q).double(), sx, sxx, _dot(x, q).double())


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) over the last dim (a batched product: several times faster than the sum on CPU)."""
    return torch.einsum("...i,...i->...", a, b)


def _fit_scale_min(n, sq, sqq, sx, sxx, sxq) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares scale >= 0 and min <= 0 of x ~ scale * q + min from the sums of :func:`_sums`."""
    det = n * sqq - sq * sq  # 0: every q equal
    ok = det > 0
    det = torch.where(ok, det, torch.ones_like(det))
    scale = torch.where(ok, (n * sxq - sx * sq) / det, torch.zeros_like(det))
    minimum = torch.where(ok, (sqq * sx - sq * sxq) / det, sx / n)
    positive = minimum > 0  # ggml's min is -dmin * m with m unsigned: hold it at 0 and refit the scale
    scale = torch.where(positive, sxq / torch.where(sqq > 0, sqq, torch.ones_like(sqq)), scale)
    minimum = torch.where(positive, torch.zeros_like(minimum), minimum)
    return scale.clamp(min=0.0), minimum


def _fixed_q_error(scale, minimum, n, sq, sqq, sx, sxx, sxq) -> torch.Tensor:
    """sum of (x - (scale * q + min))^2 from the sums, with q held fixed."""
    return (sxx - 2 * scale * sxq - 2 * minimum * sx + scale * scale * sqq + 2 * scale * minimum * sq
            + n * minimum * minimum)


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
        n_sub = cols // spec.sub_block
        values = unpack(tensors["sub_scales"].detach().cpu(), spec.sub_bits, n_sub * (1 + spec.asymmetric), torch.int32)
        _put(out, values[:, :n_sub].reshape(n_blocks, -1) ^ spec.sub_xor, spec.sub_scales)
        if spec.asymmetric:
            _put(out, values[:, n_sub:].reshape(n_blocks, -1), spec.sub_mins)
        halves = {spec.d_at: _as_fp16(tensors["d"], "d")}
        if spec.asymmetric:
            halves[spec.m_at] = _as_fp16(tensors["dmin"], "dmin")
    else:
        halves = {spec.d_at: _as_fp16(tensors["scale"], "scale")}
        if spec.asymmetric:
            halves[spec.m_at] = _as_fp16(tensors["m"], "m")
    data = out.to(torch.uint8).numpy()
    for at, half in halves.items():
        data[:, at:at + 2] = half.numpy().astype("<f2").reshape(-1, 1).view(np.uint8)
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
            f"{qtype.name} has no qft format; qft reads {', '.join(t.name for t in _BY_QTYPE)}"
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

    def half(at: int) -> torch.Tensor:  # the fp16 at byte ``at`` of every block, (rows, blocks per row)
        return torch.from_numpy(raw[:, at:at + 2].copy().view("<f2").astype(np.float16)).reshape(rows, -1)

    if spec.sub_bits:
        values = (_get(blocks, spec.sub_scales) ^ spec.sub_xor).reshape(rows, -1)
        tensors = {"d": half(spec.d_at)}
        if spec.asymmetric:
            tensors["dmin"] = half(spec.m_at)
            values = torch.cat([values, _get(blocks, spec.sub_mins).reshape(rows, -1)], dim=1)
        tensors["sub_scales"] = pack(values, spec.sub_bits)
    else:
        tensors = {"scale": half(spec.d_at)}
        if spec.asymmetric:
            tensors["m"] = half(spec.m_at)
    return QuantizedTensor(fmt, (rows, cols), pack(codes, spec.bits), tensors, torch.float32)
