"""Decompositions of a weight into quantized and high-precision parts, one module per method."""

from qft.decompose.lqlora import Decomposition, lqlora

__all__ = ["Decomposition", "lqlora"]
