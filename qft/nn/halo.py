"""HaloLinear: a linear layer whose three matmuls run in FP8 or INT8 behind Hadamard rotations (HALO).

Training a linear layer takes three products — forward Y = X·Wᵀ, input gradient dX = E·W and
weight gradient dW = Eᵀ·X (E = dL/dY) — and HALO (Ashkboos et al., 2025) casts both operands of
each to 8 bits after rotating them with Hadamard matrices H, which spreads outliers over the
rotated dimension so that one absmax scale wastes less range. By level, as IST-DASLab/HALO's
training functions define them (H over in_features, H_T over tokens):

- level 0: no rotation.
- level 1: Y = Q(XH)·Q(WH)ᵀ (the rotation cancels inside the product); dX = [Q(E)·Q(WH)]·Hᵀ and
  dW = [Q(E)ᵀ·Q(XH)]·Hᵀ reuse the rotated operands and undo H on the output.
- level 2: level 1, and E is rotated over its tokens for dX: dX = H_T·[Q(H_Tᵀ·E)·Q(WH)]·Hᵀ
  (the token count is zero-padded to the next size a Hadamard matrix is built for).

Q casts to ``precision`` ("fp8": E4M3, gradients E4M3 or E5M2; "int8") with one absmax scale per
tensor (HALO's kernels) or per row (``granularity="row"``): ``qft.kernels.low_precision``.
Rotations and products run in float32, autocast or not; the output comes in the dtype nn.Linear's
would (the autocast dtype under autocast). The rotated operands are saved for the backward in the
input's dtype and cast per product.

Two kinds of layer:

- full fine-tuning (``peft=False``): ``weight`` is the high-precision master weight and trains; under
  no_grad (evaluation, generation) its rotated 8-bit cast is kept until the weight changes, so inference
  rotates and casts only the activations;
- HALO-PEFT (``peft=True``): the base is frozen and stored cast — ``weight_codes`` (FP8 or int8
  values of W·H, or of W at level 0) and ``weight_scale`` — and a LoRA adapter (A, B, scaling
  alpha/rank, PEFT's initialisation) trains in high precision beside it, as in HALO's PEFT code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from qft.kernels.hadamard import factorisation, hadamard_transform, try_factorisation
from qft.kernels.low_precision import (FP8_FORMATS, GRANULARITIES, PRECISIONS, low_precision_matmul, quantize,
                                      scaled_matmul)
from qft.kernels.torch_path import autocast_dtype, autocast_off
from qft.nn.qlinear import peft_lora_a

LEVELS = (0, 1, 2)


@dataclass(frozen=True)
class HaloSettings:
    level: int = 2
    precision: str = "fp8"
    granularity: str = "tensor"
    grad_format: str = "e4m3"  # FP8 gradients: "e4m3" or "e5m2" (int8 ignores it)

    def __post_init__(self) -> None:
        for name, value, allowed in (("level", self.level, LEVELS), ("precision", self.precision, PRECISIONS),
                                     ("granularity", self.granularity, GRANULARITIES),
                                     ("grad_format", self.grad_format, tuple(FP8_FORMATS))):
            if value not in allowed:
                raise ValueError(f"unknown HALO {name} {value!r}; choose one of {list(allowed)}")


def _padded_tokens(t: int) -> int:
    """The least size ≥ t that a Hadamard matrix is built for."""
    while try_factorisation(t) is None:
        t += 1
    return t


def _rotate_tokens(e: torch.Tensor, transpose: bool) -> torch.Tensor:
    """H_Tᵀ·e (``transpose=False``) or H_T·e over the rows of ``e`` (tokens), zero-padded to a supported size."""
    t = e.shape[0]
    padded = _padded_tokens(t)
    if padded != t:
        e = torch.cat([e, e.new_zeros(padded - t, e.shape[1])])
    return hadamard_transform(e.t().contiguous(), transpose=transpose).t()


def _cast_rotated(weight: torch.Tensor, settings: HaloSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) of W·H (of W at level 0): the forward product's weight operand, as stored or kept."""
    w = weight.detach().float()
    return quantize(hadamard_transform(w) if settings.level else w, settings.precision, settings.granularity)


def _dequantized(frozen: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A frozen HALO-PEFT base (codes, scale) as float32: codes · scale, per tensor or per row."""
    codes, scale = frozen
    return codes.float() * scale


class _HaloMatmul(torch.autograd.Function):
    """x (tokens, in) @ Wᵀ with HALO's three low-precision products. W is ``weight`` (it trains), or,
    with ``weight=None``, ``frozen`` = (codes, scale) of a frozen W·H (HALO-PEFT): dequantized for each
    product, so no dense copy of the base stays alive between forward and backward.

    Rotations and products run in float32 with autocast off (autocast would round the rotations
    to bf16 before the 8-bit casts); the output is in nn.Linear's dtype, the gradients in their inputs'."""

    @staticmethod
    def forward(ctx, x, weight, settings: HaloSettings, frozen):
        with autocast_off(x.device):
            xr = hadamard_transform(x.float()) if settings.level else x.float()
            if weight is None:  # the stored codes are the cast operand: no dequantize-and-recast
                ctx.save_for_backward(xr.to(x.dtype))
                qx, sx = quantize(xr, settings.precision, settings.granularity)
                y = scaled_matmul(qx.contiguous(), sx, frozen[0].contiguous(), frozen[1])
            else:
                wr = hadamard_transform(weight.float()) if settings.level else weight.float()
                ctx.save_for_backward(xr.to(x.dtype), wr.to(weight.dtype))
                y = low_precision_matmul(xr, wr, settings.precision, settings.granularity)
        ctx.settings, ctx.frozen, ctx.dtypes = settings, frozen, (x.dtype, None if weight is None else weight.dtype)
        return y.to(autocast_dtype(x))

    @staticmethod
    def backward(ctx, dy):
        xr, *rest = ctx.saved_tensors
        s: HaloSettings = ctx.settings
        grad = s.grad_format
        dx = dw = None
        with autocast_off(dy.device):
            dy = dy.float()  # the token rotation's output keeps its input's dtype
            wr = rest[0] if rest else _dequantized(ctx.frozen)
            if ctx.needs_input_grad[0]:
                e = _rotate_tokens(dy, transpose=False) if s.level == 2 else dy
                dxr = low_precision_matmul(e, wr.t(), s.precision, s.granularity, fp8_a=grad)  # e @ wr
                if s.level == 2:
                    dxr = _rotate_tokens(dxr, transpose=True)[: dy.shape[0]]
                dx = (hadamard_transform(dxr, transpose=True) if s.level else dxr).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                dwr = low_precision_matmul(dy.t(), xr.t(), s.precision, s.granularity, fp8_a=grad)  # eᵀ @ xr
                dw = (hadamard_transform(dwr, transpose=True) if s.level else dwr).to(ctx.dtypes[1])
        return dx, dw, None, None


def halo_matmul(x: torch.Tensor, weight: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                settings: HaloSettings) -> torch.Tensor:
    """x (…, in) @ Wᵀ with HALO's low-precision forward and backward products; ``weight`` is W, or the
    (codes, scale) of a frozen, already rotated W·H (HALO-PEFT's base)."""
    frozen = weight if isinstance(weight, tuple) else None
    y = _HaloMatmul.apply(x.reshape(-1, x.shape[-1]), None if frozen else weight, settings, frozen)
    return y.reshape(*x.shape[:-1], (frozen[0] if frozen else weight).shape[0])


class HaloLinear(nn.Module):
    """A Linear trained through HALO's low-precision products (module doc)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, settings: HaloSettings,
                 peft: bool = False, rank: int = 0, alpha: float | None = None,
                 generator: torch.Generator | None = None, adapter_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"weight must be (out_features, in_features), got shape {tuple(weight.shape)}")
        if peft and rank < 1:
            raise ValueError("HALO-PEFT trains a LoRA adapter beside the frozen base: give rank >= 1")
        if not peft and rank:
            raise ValueError("full HALO fine-tuning trains the weight itself; rank applies with peft=True")
        self.out_features, self.in_features = weight.shape
        if settings.level:
            factorisation(self.in_features)  # the rotation's size: raises, naming the nearest supported ones
        self.settings, self.peft, self.rank = settings, peft, rank
        self.scaling = float(alpha if alpha is not None else rank) / rank if rank else 0.0
        self.lora_A = self.lora_B = None
        bias = None if bias is None else bias.detach().clone()
        if not peft:
            self.weight = nn.Parameter(weight.detach().clone())
            self._cast = self._cast_key = None  # see _cast_weight
            self.bias = None if bias is None else nn.Parameter(bias)
            return
        codes, scale = _cast_rotated(weight, settings)
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", bias)
        a = peft_lora_a(rank, self.in_features, generator)
        self.lora_A = nn.Parameter(a.to(device=weight.device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=weight.device, dtype=adapter_dtype))

    def _apply(self, fn, recurse=True):
        frozen = {n: self._buffers[n] for n in ("weight_codes", "weight_scale") if n in self._buffers}
        super()._apply(fn, recurse)
        for name, old in frozen.items():
            moved = self._buffers[name]
            if moved.dtype != old.dtype:  # a cast of the model: the stored 8-bit base and its scale stay exact
                self._buffers[name] = old.to(moved.device)
        return self

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the products see, unrotated: W (full) or the frozen cast base (PEFT)."""
        if not self.peft:
            return self.weight.detach().to(dtype)
        w = _dequantized((self.weight_codes, self.weight_scale))
        return (hadamard_transform(w, transpose=True) if self.settings.level else w).to(dtype)

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W (+ scaling·B·A for HALO-PEFT): the dense weight to export."""
        w = self.base_weight(torch.float32)
        if self.rank:
            w = w + self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        return w.to(dtype)

    def adapters(self) -> dict[str, nn.Parameter]:
        """What trains: the weight and bias (full), or the LoRA factors (PEFT)."""
        names = ("weight", "bias") if not self.peft else ("lora_A", "lora_B")
        return {n: p for n in names if isinstance(p := getattr(self, n), nn.Parameter)}

    def _cast_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward product's weight operand, W·H cast to 8 bits, kept until the weight changes (an
        optimizer step bumps its version, a move or a load its storage): inference then rotates only x."""
        w = self.weight
        key = (w._version, w.data_ptr(), w.dtype)
        if self._cast_key != key:
            self._cast, self._cast_key = _cast_rotated(w, self.settings), key
        return self._cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.peft:
            y = halo_matmul(x, (self.weight_codes, self.weight_scale), self.settings)
        elif not torch.is_grad_enabled():  # nothing to differentiate: the cached cast weight, as a frozen base
            y = halo_matmul(x, self._cast_weight(), self.settings)
        else:
            self._cast = self._cast_key = None  # training changes the weight: hold no stale copy
            y = halo_matmul(x, self.weight, self.settings)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.rank:
            a = self.lora_A
            y = y + self.scaling * ((x.to(a.dtype) @ a.t()) @ self.lora_B.t()).to(y.dtype)
        return y

    def spec(self) -> dict:
        """What it takes to rebuild the layer empty (checkpoints record it)."""
        return {"layer": "halo", "shape": [self.out_features, self.in_features], **asdict(self.settings),
                "peft": self.peft, "rank": self.rank, "alpha": self.scaling * self.rank if self.rank else None,
                "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in self.state_dict().items()}}

    @classmethod
    def empty(cls, spec: dict, device=None) -> HaloLinear:
        """A layer of the layout ``spec`` describes, zeros everywhere: a checkpoint fills it."""
        dtypes = {k: getattr(torch, v) for k, v in spec["dtypes"].items()}
        settings = HaloSettings(spec["level"], spec["precision"], spec["granularity"], spec["grad_format"])
        weight = torch.zeros(spec["shape"], device=device)
        bias = torch.zeros(spec["shape"][0], device=device) if "bias" in dtypes else None
        layer = cls(weight, bias, settings=settings, peft=spec["peft"], rank=spec["rank"], alpha=spec["alpha"],
                    adapter_dtype=dtypes.get("lora_A", torch.float32))
        for name, t in list(layer.state_dict(keep_vars=True).items()):
            t.data = t.data.to(dtypes[name])
        return layer

    def extra_repr(self) -> str:
        s = self.settings
        kind = f"peft rank={self.rank}" if self.peft else "full"
        return (f"in={self.in_features}, out={self.out_features}, level={s.level}, {s.precision}, "
                f"scales per {s.granularity}, {kind}")
