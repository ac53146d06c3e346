"""An opt-in dense weight cache for inference.

A QLinear dequantizes its weight on every forward, which is what keeps training
memory low but dominates token-by-token generation (each new token pays a
dequantization of the whole model). Inside ``dense_weights(model)`` every
QLinear keeps its dequantized weight, and forwards that need no gradient use
it: the same numbers as the CPU torch path (dequantize, then matmul), at the
cost of one dense copy of the quantized layers, which is logged and yielded.
Leave the context before training: the cache holds the scales as they were on entry.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from qft.nn.qlinear import QLinear

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def dense_weights(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[int]:
    """Cache every QLinear's dense weight (in ``dtype``, default the weight's own) for the block;
    yields the bytes the cache holds and frees it on exit."""
    from qft.nn import qft_layers  # here: qft.nn's __init__ imports this module before defining it

    layers = list(qft_layers(model, (QLinear,)).values())  # a tied layer once
    held = 0
    try:
        with torch.no_grad():
            for layer in layers:
                layer.dense_cache = layer.weight.dequantize(dtype)
                held += layer.dense_cache.numel() * layer.dense_cache.element_size()
        logger.info("dense weight cache: %.1f MiB for %d layers", held / 2**20, len(layers))
        yield held
    finally:
        for layer in layers:
            layer.dense_cache = None
