"""qft: quantization-aware low-bit fine-tuning of language models."""

import logging

from qft.data import default_corpus
from qft.evaluate import perplexity
from qft.fisher import empirical_fisher
from qft.formats import FP8, Format, NormalFloat, UniformInt, get_format
from qft.models import default_model
from qft.nn import QLinear
from qft.plot import bits_heatmap
from qft.prepare import quantize_and_prepare
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
    "bits_heatmap",
    "default_corpus",
    "default_model",
    "empirical_fisher",
    "find_target_linears",
    "get_format",
    "perplexity",
    "quantization_error_table",
    "quantize_and_prepare",
]
