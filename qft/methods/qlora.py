"""QLoRA-style preparation: quantize W as it is, add PEFT-initialised LoRA factors.

A is drawn Kaiming-uniform from one generator shared by every layer (as PEFT
draws all layers from one stream), B is zero, so the model starts as the plain
quantized model. ``rank=0`` gives plain quantization with nothing to train.
"""

from __future__ import annotations

import torch

from qft.methods import Built, MethodOptions, quantize, register_method, weighted_error
from qft.quant.formats import Format
from qft.nn import QLinear


@register_method("qlora", needs_rank=False, table_rank=lambda rank: 0,
                 description="plain quantization + PEFT-initialised LoRA (B = 0)")
def build(w: torch.Tensor, bias: torch.Tensor | None, fmt: Format, options: MethodOptions) -> Built:
    qweight = quantize(w, fmt, options)
    layer = QLinear(qweight, bias, rank=options.rank, alpha=options.alpha, generator=options.generator)
    return Built(layer, weighted_error(w, qweight.dequantize(torch.float32), options.fisher))
