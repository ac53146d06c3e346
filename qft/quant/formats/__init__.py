"""Number formats, one module each, and the names that select them.

Names (``get_format``):

- ``nf{k}`` or ``nf{k}-b{B0}``: NormalFloat-k, k in {2,3,4,8}, blocks of B0 in
  {16,32,64} (default 64) with fp32 absmax scales.
- ``nf{k}-b{B0}-dq{b0}b{B1}[-fp16]``: the same with scales double-quantized to
  b0 in {2,3,4,8} bits in blocks of B1 in {16,64,256}, second level fp32 (or fp16).
- ``int{k}``, ``int{k}-g{g}``, ``int{k}-ch``: uniform asymmetric int-k, k in 2..8,
  groups of g in {16,...,256} (default 128) or one group per output channel.
- ``fp8``, ``fp8-{e4m3,e5m2}[-{row,tensor}]``: FP8 with per-row (default) or
  per-tensor scale.
- ``q8_0``, ``q4_0``, ``q5_0``, ``q6_k``, ``q3_k``: llama.cpp's symmetric block
  formats, and ``q4_1``, ``q5_1``, ``q2_k``, ``q4_k``, ``q5_k``: its asymmetric ones
  (an offset per block, ``Format.decode_offset``), all bit-exact with ggml
  (``to_ggml`` / ``from_ggml`` convert to and from GGUF tensor bytes).
"""

from __future__ import annotations

import re

from qft.quant.formats.base import Format, check_weight
from qft.quant.formats.fp8 import FP8
from qft.quant.formats.ggml import GGML_TYPES, GGMLFormat, from_ggml, is_ggml, to_ggml
from qft.quant.formats.intk import UniformInt
from qft.quant.formats.nf import NormalFloat, nf_codebook

__all__ = ["FP8", "GGML_TYPES", "Format", "GGMLFormat", "NormalFloat", "UniformInt", "check_weight", "from_ggml",
           "get_format", "is_ggml", "nf_codebook", "to_ggml"]

_NF = re.compile(r"nf(\d+)(?:-b(\d+))?(?:-dq(\d+)b(\d+)(?:-(fp16|fp32))?)?")
_INT = re.compile(r"int(\d+)(?:-(?:g(\d+)|(ch)))?")
_FP8 = re.compile(r"fp8(?:-(e4m3|e5m2))?(?:-(row|tensor))?")


def get_format(spec: str | Format) -> Format:
    """Return the format a name describes (or ``spec`` itself if it is a Format)."""
    if isinstance(spec, Format):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a format is a name like 'nf4' or a Format, got {type(spec).__name__}")
    name = spec.strip().lower()
    if m := _NF.fullmatch(name):
        k, block, scale_bits, scale_block, second = m.groups()
        return NormalFloat(
            bits=int(k),
            block=int(block or 64),
            scale_bits=None if scale_bits is None else int(scale_bits),
            scale_block=int(scale_block or 256),
            second_level=second or "fp32",
        )
    if m := _INT.fullmatch(name):
        k, group, per_channel = m.groups()
        return UniformInt(bits=int(k), group_size=None if per_channel else int(group or 128))
    if m := _FP8.fullmatch(name):
        kind, scaling = m.groups()
        return FP8(kind=kind or "e4m3", scaling=scaling or "row")
    if name in GGML_TYPES:
        return GGMLFormat(name)
    raise ValueError(
        f"unknown format {spec!r}; examples of valid names: 'nf4', 'nf3-b64-dq8b256', "
        "'nf2-b32-dq4b64-fp16', 'int4-g128', 'int8-ch', 'fp8-e4m3-row', 'q4_0', 'q4_k', 'q6_k'"
    )
