"""transformers integration: ``AutoModelForCausalLM.from_pretrained(folder)`` reads qft checkpoints,
and ``from_pretrained(folder, quantization_config=qft.LQLoRAConfig(...))`` quantizes while loading.

Importing qft registers quant_method "qft". Before transformers loads the
weights (on the meta device), the quantizer swaps the listed Linear layers for
empty QLinear layers (on the meta device too) and checks every checkpoint file
against them, so a truncated or incomplete checkpoint fails instead of loading
random weights. The loader then sets each flat tensor (``weight_codes``,
``lora_A``, ...) on its QLinear, which puts it in place. Afterwards only the
adapters train (Trainer accepts the model).

Given a qft config instead (quantize on load, as ``BitsAndBytesConfig(load_in_4bit=True)`` does for
QLoRA), transformers loads the full-precision weights as usual and the quantizer then applies the
config with ``qft.quantize_`` (the whole model is loaded first: this path does not stream; for a
model larger than memory, ``qft.quantize_(folder, config)`` reads one weight at a time). Calibration
text for ``fisher=True`` or GPTQ rounding is read with the folder's own tokenizer.

``quantize_`` marks the model it prepares the same way (:func:`record_quantization_config`),
so that ``save_pretrained`` (and so every ``Trainer`` checkpoint) writes a qft checkpoint too.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel
from transformers.quantizers import (
    HfQuantizer,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from qft.files.checkpoint import (
    FORMAT_VERSION,
    QUANT_METHOD,
    check_quantization_config,
    check_tensors,
    checkpoint_contents,
    quantization_config,
    swap_in_empty_layers,
    tensor_layout,
)
from qft.methods.config import BudgetConfig, QuantConfig
from qft.nn import mark_trainable


class QftConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a qft checkpoint (see qft.files.checkpoint.quantization_config)."""

    def __init__(self, modules: dict | None = None, **kwargs) -> None:
        self.quant_method = QUANT_METHOD
        self.modules = modules or {}
        for key, value in kwargs.items():
            if key != "quant_method":
                setattr(self, key, value)


class QftHfQuantizer(HfQuantizer):
    """Reads a qft checkpoint (pre-quantized), or quantizes a full-precision model as its qft config says."""

    def validate_environment(self, *args, **kwargs) -> None:
        if self.pre_quantized:
            check_quantization_config(self.quantization_config.to_dict(), "this checkpoint")
        elif not isinstance(self.quantization_config, QuantConfig):
            raise ValueError("quantize on load takes a qft config object (qft.LQLoRAConfig(...), qft.PEQAConfig(...), "
                             f"...), got {type(self.quantization_config).__name__}")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:  # the weights load as they are; quantize_ runs once they are in
            return
        with torch.device("meta"):
            swap_in_empty_layers(model, self.quantization_config.modules)
        found = {}
        for path in checkpoint_files or []:
            if str(path).endswith(".safetensors"):
                found.update(tensor_layout(path))
            else:
                raise ValueError(f"{path}: qft checkpoints are read from safetensors files only")
        expected = model.state_dict()
        # the rest of the model is still on the meta device, where every tensor has data_ptr 0, so
        # checkpoint.shared_keys cannot tell tied tensors apart: transformers' own tying map says which are
        tied = set(getattr(model, "all_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
        check_tensors(found, expected, tied, self.quantization_config.modules, "the checkpoint")

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            mark_trainable(model)
            return model
        from qft.prepare.quantize import quantize_  # the front door imports this module to mark what it prepares

        config = self.quantization_config
        reads_text = isinstance(config, BudgetConfig) and (config.fisher or config.resolved_rounding == "gptq")
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path) if reads_text else None
        return quantize_(model, config, tokenizer=tokenizer, progress=False)

    def get_state_dict_and_metadata(self, model):
        """save_pretrained writes what save_quantized writes, with the quantization_config of the model as it
        is now (a cast since preparation changed the dtypes it records)."""
        state, config = checkpoint_contents(model)
        self.quantization_config = QftConfig(**config)
        model.config.quantization_config = self.quantization_config
        return state, {"qft_format_version": str(FORMAT_VERSION)}

    def is_serializable(self, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def record_quantization_config(model: nn.Module) -> None:
    """Mark a prepared model as from_pretrained marks a loaded qft checkpoint: its config carries the qft
    quantization_config and ``model.hf_quantizer`` is qft's, so that ``save_pretrained`` writes a checkpoint
    that from_pretrained rebuilds (unmarked, from_pretrained builds plain Linear layers and leaves them
    random). Anything but a transformers model (a bare stack of layers) is left as it is. Like every
    quantized transformers model (bitsandbytes' too), a marked one refuses ``.half()``/``.float()``;
    ``.to(dtype)`` casts it."""
    if not isinstance(model, PreTrainedModel):
        return
    quantizer = QftHfQuantizer(QftConfig(**quantization_config(model)))
    model.is_quantized, model.quantization_method, model.hf_quantizer = True, QUANT_METHOD, quantizer
    quantizer.postprocess_model(model)  # as from_pretrained: config.quantization_config, frozen base


if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:  # a module reload must not register twice
    register_quantization_config(QUANT_METHOD)(QftConfig)
    register_quantizer(QUANT_METHOD)(QftHfQuantizer)
