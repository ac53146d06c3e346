"""Modules that hold quantized weights."""

from qft.nn.dense_cache import dense_weights
from qft.nn.qlinear import QLinear, dense_weight, mark_trainable

__all__ = ["QLinear", "dense_weight", "dense_weights", "mark_trainable"]
