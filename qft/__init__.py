"""qft: quantization-aware low-bit fine-tuning of language models."""

import logging
from pathlib import Path

# kernels/ and solvers/ sit beside qft/ in the repository and are namespace packages, so that the
# repository root on sys.path never shadows Hugging Face's `kernels` (docs/DESIGN.md, Layout). A
# wheel holds them as qft/kernels and qft/solvers; in a checkout (editable install, or Python started
# at the root) they are found beside this folder.
_CHECKOUT = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "kernels").is_dir() and (_CHECKOUT / "kernels" / "dispatch.py").is_file():
    __path__.append(str(_CHECKOUT))

from qft.prepare import hf_quantizer  # noqa: F401  (registers quant_method "qft" with transformers)
from qft.files.adapters import load_adapter, save_adapter
from qft.files.checkpoint import load_quantized, save_quantized
from qft.exports.compeft import compress_adapter, decompress_adapter
from qft.files.data import default_corpus, load_texts
from qft.methods import register_method, register_prepare_method
from qft.methods.config import (
    BudgetConfig,
    HALOConfig,
    INT21Config,
    LoftQConfig,
    LQLoRAConfig,
    PEQAConfig,
    QALoRAConfig,
    QLoRAConfig,
    QuantConfig,
    WholeModelConfig,
)
from qft.methods.lrec import LREC
from qft.nn.distributed import gathered, replicate, shard
from qft.training.evaluate import perplexity
from qft.training.tasks import evaluate_tasks
from qft.exports.gguf import export_gguf, export_gguf_lora
from qft.exports.merged import export_dense, export_merged, load_merged
from qft.prepare.fisher import empirical_fisher
from qft.quant.formats import FP8, Format, NormalFloat, UniformInt, get_format
from qft.files.models import default_model, named_model
from qft.nn import HaloLinear, HaloSettings, QLinear, dense_weights, mark_trainable
from qft.exports.peft import export_peft
from qft.prepare.plot import bits_heatmap
from qft.prepare.quantize import quantize_, quantize_and_prepare
from qft.prepare.report import quantization_error_table
from qft.nn.targets import find_target_linears
from qft.quant.tensor import QuantizedTensor
from qft.methods.qalora import merge_qalora
from qft.training.loop import TrainConfig, register_objective, train

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "FP8",
    "BudgetConfig",
    "HALOConfig",
    "INT21Config",
    "LQLoRAConfig",
    "LoftQConfig",
    "PEQAConfig",
    "QALoRAConfig",
    "QLoRAConfig",
    "QuantConfig",
    "WholeModelConfig",
    "LREC",
    "Format",
    "HaloLinear",
    "HaloSettings",
    "NormalFloat",
    "QLinear",
    "QuantizedTensor",
    "TrainConfig",
    "UniformInt",
    "bits_heatmap",
    "compress_adapter",
    "decompress_adapter",
    "default_corpus",
    "default_model",
    "named_model",
    "dense_weights",
    "empirical_fisher",
    "evaluate_tasks",
    "export_dense",
    "export_gguf",
    "export_gguf_lora",
    "merge_qalora",
    "export_merged",
    "export_peft",
    "find_target_linears",
    "gathered",
    "get_format",
    "load_adapter",
    "load_merged",
    "load_quantized",
    "load_texts",
    "mark_trainable",
    "perplexity",
    "quantization_error_table",
    "quantize_",
    "quantize_and_prepare",
    "register_method",
    "register_prepare_method",
    "register_objective",
    "replicate",
    "save_adapter",
    "save_quantized",
    "shard",
    "train",
]
