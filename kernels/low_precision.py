"""Low-precision matmuls: A·Bᵀ with both operands cast to FP8 or INT8, as HALO trains.

Each operand is scaled symmetrically by its absmax — one scale per tensor, or one per row
(the operand's outer dimension, so that the scales factor out of the product) — then cast:

- ``"fp8"``: E4M3 (largest 448) or, for gradients, E5M2 (57344); ``torch._scaled_mm`` multiplies
  on CUDA GPUs with FP8 tensor cores (sm_89+) when the shapes are multiples of 16; elsewhere the
  casts are emulated: the FP8 values in float32, then a float32 matmul.
- ``"int8"``: round(x / scale) in [−127, 127]; ``torch._int_mm`` on CUDA (int32 accumulation;
  more than 16 rows and inner and outer sizes divisible by 8), else the same integers in a
  float32 matmul (exact products; fp32 accumulation).

On CPU both products are emulated: torch's CPU ``_int_mm`` is many times slower than the float32
matmul of the same integers, and its CPU ``_scaled_mm`` no faster (RESULTS.md's HALO section).

The result is in float32: dequantised by the product of the two scales.
"""

from __future__ import annotations

import torch

PRECISIONS = ("fp8", "int8")
FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
GRANULARITIES = ("tensor", "row")


def symmetric_cast(x: torch.Tensor, dtype: torch.dtype, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) of a 2-D float32 ``x`` scaled by its absmax onto ``dtype``'s largest value (FP8:
    448 or 57344, by round-to-nearest-even cast; int8: 127, by round()), clamped there and cast; the
    float32 scale is of shape () per tensor or (rows, 1) ``per_row``, 1 where it would be 0."""
    top = torch.finfo(dtype).max if dtype.is_floating_point else torch.iinfo(dtype).max
    scale = (x.abs().amax(dim=1, keepdim=True) if per_row else x.abs().amax()) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = x / scale
    if not dtype.is_floating_point:
        q = torch.round(q)
    return q.clamp(-top, top).to(dtype), scale


def quantize(x: torch.Tensor, precision: str, granularity: str = "tensor",
             fp8: str = "e4m3") -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) of a 2-D ``x``: FP8 values or int8 integers, and float32 scales of shape ()
    per tensor or (rows, 1) per row, so that x ≈ codes · scale."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown scale granularity {granularity!r}; choose one of {list(GRANULARITIES)}")
    if precision == "fp8" and fp8 not in FP8_FORMATS:
        raise ValueError(f"unknown FP8 format {fp8!r}; choose one of {list(FP8_FORMATS)}")
    return symmetric_cast(x.float(), FP8_FORMATS[fp8] if precision == "fp8" else torch.int8, granularity == "row")


def _fast_fp8(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not hasattr(torch, "_scaled_mm") or (a.dtype == b.dtype == torch.float8_e5m2):
        return False
    if a.device.type != "cuda" or torch.cuda.get_device_capability(a.device) < (8, 9):
        return False
    return a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0


def _fast_int8(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device.type == "cuda" and a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[0] % 8 == 0


def scaled_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """(a·a_scale) @ (b·b_scale)ᵀ in float32, for codes from :func:`quantize` (a (m, k), b (n, k))."""
    if a.dtype == torch.int8:
        if _fast_int8(a, b):
            product = torch._int_mm(a, b.t()).float()
        else:
            product = a.float() @ b.float().t()
        return product * a_scale * b_scale.reshape(1, -1)
    if _fast_fp8(a, b):
        row = a_scale.dim() == 2 or b_scale.dim() == 2
        if row:  # row-wise scales: (m, 1) and (1, n), both given; CUDA writes them in bf16 only
            sa = a_scale.expand(a.shape[0], 1).contiguous()
            sb = b_scale.reshape(1, -1).expand(1, b.shape[0]).contiguous()
            return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16).float()
        return torch._scaled_mm(a, b.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=torch.float32)
    return (a.float() @ b.float().t()) * a_scale * b_scale.reshape(1, -1)


def low_precision_matmul(a: torch.Tensor, b: torch.Tensor, precision: str, granularity: str = "tensor",
                         fp8_a: str = "e4m3", fp8_b: str = "e4m3") -> torch.Tensor:
    """a @ bᵀ (a (m, k), b (n, k), any float dtype) with both operands cast to ``precision``; float32."""
    qa, sa = quantize(a, precision, granularity, fp8_a)
    qb, sb = quantize(b, precision, granularity, fp8_b)
    return scaled_matmul(qa.contiguous(), sa, qb.contiguous(), sb)  # row-major codes, as _scaled_mm wants them
