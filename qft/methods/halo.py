"""HALO (Ashkboos et al., 2025): every projection trains through FP8 or INT8 matmuls behind
Hadamard rotations (``qft.nn.halo``).

``quantize_and_prepare(model, method="halo", level=2, precision="fp8")`` swaps each target
Linear for a HaloLinear: full fine-tuning by default (the projections' high-precision weights and
biases train; embeddings and norms stay frozen, as for every qft method), or, with ``peft=True``,
HALO-PEFT: a frozen base stored in 8 bits plus a LoRA adapter of ``rank`` (default 16) and
``alpha`` (default rank) that trains in high precision.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from qft.methods import register_prepare_method
from qft.nn import HaloLinear, HaloSettings, dense_weight, tied_names

PEFT_RANK = 16


@register_prepare_method("halo", options=("level", "precision", "granularity", "grad_format", "peft"),
                         description="HALO: FP8/INT8 matmuls behind Hadamard rotations; full fine-tuning or "
                                     "peft=True (8-bit frozen base + LoRA)")
def prepare(model: nn.Module, targets: dict[str, nn.Module], *, rank: int, alpha: float | None, seed: int,
            progress: bool, level: int = 2, precision: str = "fp8", granularity: str = "tensor",
            grad_format: str = "e4m3", peft: bool = False) -> dict[str, HaloLinear]:
    settings = HaloSettings(level, precision, granularity, grad_format)  # HALOConfig has checked rank and peft
    rank = (rank or PEFT_RANK) if peft else 0
    generator = torch.Generator().manual_seed(seed)  # one stream for every layer's LoRA A, as PEFT draws them
    tied = tied_names(targets)  # a layer tied at several places is swapped once, one object everywhere
    layers: dict[str, HaloLinear] = {}
    for name, linear in tqdm(targets.items(), disable=not progress, desc="halo", unit="matrix"):
        layers[name] = layers[tied[name]] if name in tied else HaloLinear(
            dense_weight(linear), linear.bias, settings=settings, peft=peft, rank=rank, alpha=alpha,
            generator=generator).to(linear.weight.device)
    return layers
