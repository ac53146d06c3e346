"""Modules that hold quantized weights."""

from qft.nn.qlinear import QLinear

__all__ = ["QLinear"]
