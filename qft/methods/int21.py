"""INT2.1 (Chai et al., 2023): a GPTQ int2 base plus LoRA, trained to correct the quantization error.

The base is GPTQ-rounded asymmetric int2 in groups of 128 (the reference's
``--wbits 2 --groupsize 128``), the LoRA factors are PEFT-initialised (B = 0) at rank 32
with alpha 128 on every projection, as the paper's scripts set them. What makes it INT2.1
is the training objective, Low-Rank Error Correction: distillation from the
full-precision model (``qft.train(..., teacher=fp_model, objective="lrec")``, see
``qft.methods.lrec``). A budget (``bits=2.5``) allocates over PEQA's int grid.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from qft.methods import Built, MethodOptions, qlora, register_method
from qft.methods.peqa import int_grid
from qft.quant.formats import Format

PAPER_ALPHA_PER_RANK = 4  # lora_alpha 128 at lora_r 32


def grouped(width: int) -> str:
    """``bits=2`` is the paper's setting: int2 in groups of 128."""
    return f"int{width}-g128"


@register_method("int21", needs_rank=True, table_rank=lambda rank: 0, grid=int_grid, default_rank=32,
                 width_format=grouped, rounding="gptq",
                 description="INT2.1: GPTQ int-k base + LoRA (B = 0), trained with objective='lrec'")
def build(w: torch.Tensor, bias: torch.Tensor | None, fmt: Format, options: MethodOptions) -> Built:
    if options.alpha is None:
        options = replace(options, alpha=float(PAPER_ALPHA_PER_RANK * options.rank))
    return qlora.build(w, bias, fmt, options)
