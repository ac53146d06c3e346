"""QLinear: a frozen quantized weight plus small trainable high-precision parts.

    y = x @ dequant(Q).T + bias + (alpha / rank) * (x @ A.T) @ B.T

Q's packed codes and stored scales are buffers (never parameters, never
trained). Trainable are the low-rank factors A (rank, in) and B (out, rank)
and, optionally, the per-block scales (PEQA). The dense weight exists only
inside one call of the dequant-matmul dispatch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qft.kernels import dequant_matmul
from qft.tensor import QuantizedTensor, _decode_name

_PREFIX = "weight_"


class QLinear(nn.Module):
    def __init__(
        self,
        weight: QuantizedTensor,
        bias: torch.Tensor | None = None,
        *,
        rank: int = 0,
        alpha: float | None = None,
        lora_a: torch.Tensor | None = None,
        lora_b: torch.Tensor | None = None,
        train_scales: bool = False,
        seed: int = 0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.out_features, self.in_features = weight.shape
        self.format = weight.format
        self.rank = int(rank)
        self.backend = backend
        for name, t in weight.to_tensors().items():
            self.register_buffer(_PREFIX + name, t)
        self.register_buffer("codebook", weight.codebook(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")

        self.scale = None
        if train_scales:
            self.scale = nn.Parameter(weight.scales()[0].clone())
        # Stored tensors keep their dtype through .to(dtype) / .half(): see _apply.
        self._frozen_dtype = [n for n, b in self._buffers.items() if b is not None and n != "bias"]

        self.lora_A = self.lora_B = None
        if rank:
            a, b = self._init_factors(lora_a, lora_b, seed)
            self.lora_A = nn.Parameter(a.to(weight.codes.device))
            self.lora_B = nn.Parameter(b.to(weight.codes.device))
            # a buffer, so that a state_dict alone describes the layer
            self.register_buffer("lora_scaling", torch.tensor((alpha if alpha is not None else rank) / rank))
        elif lora_a is not None or lora_b is not None:
            raise ValueError("low-rank factors were given but rank=0; pass rank=A.shape[0]")

    def _init_factors(self, a, b, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        want_a, want_b = (self.rank, self.in_features), (self.out_features, self.rank)
        if a is None:
            # As PEFT's LoRA: A Kaiming-uniform, B zero, so the adapter starts as a no-op.
            gen = torch.Generator().manual_seed(seed)
            bound = 1 / math.sqrt(self.in_features)
            a = (torch.rand(want_a, generator=gen) * 2 - 1) * bound
        if b is None:
            b = torch.zeros(want_b)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValueError(
                f"low-rank factors must be A {want_a} and B {want_b}, "
                f"got A {tuple(a.shape)} and B {tuple(b.shape)}"
            )
        # contiguous: a checkpoint stores them so, and a matmul on another layout may round differently
        return (a.detach().float().clone(memory_format=torch.contiguous_format),
                b.detach().float().clone(memory_format=torch.contiguous_format))

    @classmethod
    def from_linear(cls, linear: nn.Linear, format, **kwargs) -> QLinear:
        """Quantize an ``nn.Linear`` (its bias is kept, frozen)."""
        qweight = QuantizedTensor.quantize(linear.weight, format)
        return cls(qweight, linear.bias, **kwargs)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "", **kwargs) -> QLinear:
        """Rebuild a QLinear from its state_dict alone (format and shape are stored in it)."""
        qt = QuantizedTensor.from_tensors(
            {k[len(prefix + _PREFIX):]: v for k, v in state.items() if k.startswith(prefix + _PREFIX)}
        )
        lora_a = state.get(prefix + "lora_A")
        rank = 0 if lora_a is None else lora_a.shape[0]
        module = cls(
            qt,
            state.get(prefix + "bias"),
            rank=rank,
            alpha=float(state[prefix + "lora_scaling"]) * rank if rank else None,
            lora_a=lora_a,
            lora_b=state.get(prefix + "lora_B"),
            train_scales=prefix + "scale" in state,
            **kwargs,
        )
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(own, strict=True)
        return module

    def _apply(self, fn, recurse=True):
        """Move, but never cast, the quantized weight's tensors: a cast would change the weight."""
        kept = {n: self._buffers[n] for n in self._frozen_dtype}
        super()._apply(fn, recurse)
        for n, original in kept.items():
            self._buffers[n] = original.to(self._buffers[n].device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        error_msgs = args[-1]
        key = prefix + _PREFIX + "format"
        if key in state_dict and _decode_name(state_dict[key]) != self.format.name:
            error_msgs.append(
                f"{key}: the state holds a {_decode_name(state_dict[key])} weight, this layer is {self.format.name}; "
                "build the layer with QLinear.from_state_dict instead"
            )
            return
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def scaling(self) -> float:
        """alpha / rank, the factor on the low-rank term (0 without one)."""
        return float(self.lora_scaling) if self.rank else 0.0

    @property
    def qweight(self) -> QuantizedTensor:
        """The frozen quantized weight, as a view on this module's buffers."""
        tensors = {
            n[len(_PREFIX):]: t
            for n, t in self.named_buffers(recurse=False)
            if n.startswith(_PREFIX) and n not in (_PREFIX + "shape", _PREFIX + "format")
        }
        return QuantizedTensor(self.format, (self.out_features, self.in_features), tensors.pop("codes"), tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got {tuple(x.shape)}")
        qweight = self.qweight
        scale, zero = qweight.scales()
        if self.scale is not None:
            scale = self.scale
        y = dequant_matmul(
            x, qweight.codes, self.codebook, scale, zero,
            bits=self.format.bits, cols=self.in_features, block=qweight.block, backend=self.backend,
        )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.rank:
            low_rank = (x.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()
            y = y + (self.lora_scaling * low_rank).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}", self.format.name]
        if self.rank:
            parts.append(f"rank={self.rank}, scaling={self.scaling:g}")
        if self.scale is not None:
            parts.append("train_scales=True")
        return ", ".join(parts)
