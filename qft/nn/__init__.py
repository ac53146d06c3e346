"""Modules that hold quantized weights."""

from qft.nn.qlinear import QLinear, dense_weight, mark_trainable

__all__ = ["QLinear", "dense_weight", "mark_trainable"]
