"""qft: quantization-aware low-bit fine-tuning of language models."""

import logging

from qft.data import default_corpus
from qft.formats import FP8, Format, NormalFloat, UniformInt, get_format
from qft.models import default_model
from qft.nn import QLinear
from qft.report import quantization_error_table
from qft.targets import find_target_linears
from qft.tensor import QuantizedTensor

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "FP8",
    "Format",
    "NormalFloat",
    "QLinear",
    "QuantizedTensor",
    "UniformInt",
    "default_corpus",
    "default_model",
    "find_target_linears",
    "get_format",
    "quantization_error_table",
]
