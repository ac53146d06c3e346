"""transformers integration: ``AutoModelForCausalLM.from_pretrained(folder)`` reads qft checkpoints.

Importing qft registers quant_method "qft". Before transformers loads the
weights (on the meta device), the quantizer swaps the listed Linear layers for
empty QLinear layers and checks every checkpoint file against them, so a
truncated or incomplete checkpoint fails instead of loading random weights.
After loading it rebuilds the codebooks (non-persistent buffers that the
loader leaves uninitialised). The model stays trainable (Trainer accepts it).
"""

from __future__ import annotations

import torch
from transformers.quantizers import (
    HfQuantizer,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from qft.checkpoint import (
    QUANT_METHOD,
    check_quantization_config,
    check_tensors,
    swap_in_empty_layers,
    tensor_layout,
)
from qft.nn import QLinear


class QftConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a qft checkpoint (see qft.checkpoint.quantization_config)."""

    def __init__(self, modules: dict | None = None, **kwargs) -> None:
        self.quant_method = QUANT_METHOD
        self.modules = modules or {}
        for key, value in kwargs.items():
            if key != "quant_method":
                setattr(self, key, value)


class QftHfQuantizer(HfQuantizer):
    requires_calibration = True  # reads checkpoints written by qft.save_quantized; quantizing is qft's job

    def validate_environment(self, *args, **kwargs) -> None:
        check_quantization_config(self.quantization_config.to_dict(), "this checkpoint")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        # transformers builds the model under torch.device("meta"); the new layers' codebooks are
        # computed, not loaded, so they (and the small empty buffers) are made on the CPU
        with torch.device("cpu"):
            swap_in_empty_layers(model, self.quantization_config.modules)
        found = {}
        for path in checkpoint_files or []:
            if str(path).endswith(".safetensors"):
                found.update(tensor_layout(path))
            else:
                raise ValueError(f"{path}: qft checkpoints are read from safetensors files only")
        expected = model.state_dict()
        # the rest of the model is still on the meta device, where every tensor has data_ptr 0, so
        # checkpoint.shared_keys cannot tell tied tensors apart: the config says which one is tied
        tied = {k for k in expected if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
        check_tensors(found, expected, tied, self.quantization_config.modules, "the checkpoint")

    def _process_model_after_weight_loading(self, model, **kwargs):
        for module in model.modules():
            if isinstance(module, QLinear):
                module.codebook = module.format.codebook().to(module.weight_codes.device)
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(("lora_A", "lora_B", ".scale")))
        return model

    def is_serializable(self, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:  # a module reload must not register twice
    register_quantization_config(QUANT_METHOD)(QftConfig)
    register_quantizer(QUANT_METHOD)(QftHfQuantizer)
