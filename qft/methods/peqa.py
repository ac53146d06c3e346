"""PEQA (Kim et al., NeurIPS 2023): round-to-nearest int-k, then train only the scales.

Each weight is quantized with asymmetric uniform int-k (per output channel or per group); the
integer codes and zero-points are frozen and the scales become the layer's only adapter
(``QLinear(train_scales=True)``: the trainable scale is the weight's own stored scale, so the
fine-tuned model *is* an int-k model, with nothing to merge). With an average budget the ILP
picks one int-k configuration per matrix from :func:`int_grid` (mixed-precision PEQA, which the
paper does not have).
"""

from __future__ import annotations

import torch

from qft.methods import Built, MethodOptions, quantize, register_method, weighted_error
from qft.quant.formats import Format, UniformInt
from qft.nn import QLinear


def int_grid() -> list[Format]:
    """PEQA's candidates: int2/3/4/8, per channel or in groups of 32, 64 or 128."""
    return [UniformInt(bits, group) for bits in (2, 3, 4, 8) for group in (None, 32, 64, 128)]


def per_channel(width: int) -> str:
    """``bits=4`` (an int) is the paper's setting: int4 with one scale per output channel."""
    return f"int{width}-ch"


@register_method("peqa", needs_rank=False, table_rank=lambda rank: 0, grid=int_grid, default_rank=0,
                 width_format=per_channel, description="PEQA: frozen int-k codes and zero-points, trainable scales")
def build(w: torch.Tensor, bias: torch.Tensor | None, fmt: Format, options: MethodOptions) -> Built:
    if not isinstance(fmt, UniformInt):
        raise ValueError(f"PEQA trains the scales of uniform int-k formats, not {fmt.name}; "
                         "give bits as a budget, or a format such as 'int4-ch' or 'int3-g64'")
    if options.rank:
        raise ValueError("PEQA trains scales only, no low-rank factors; leave rank unset (or 0)")
    qweight = quantize(w, fmt, options)
    layer = QLinear(qweight, bias, train_scales=True)
    return Built(layer, weighted_error(w, qweight.dequantize(torch.float32), options.fisher))
