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
QLoRA), the quantizer streams as ``qft.quantize_(folder, config)`` does: before transformers loads
anything it plans every layer from the checkpoint files, one target weight read at a time
(allocation, decompositions); while transformers loads, each target weight it reads is dropped
(a zero-size placeholder takes its place); afterwards the planned layers are swapped in. Peak
memory is the packed layers plus what stays in full precision. A config that runs calibration
text through the full-precision model (``fisher=True``, GPTQ rounding) or a whole-model method
(HALO, INT2.1) loads the model first and applies ``qft.quantize_`` to it; calibration text is
read with the folder's own tokenizer.

``quantize_`` marks the model it prepares the same way (:func:`record_quantization_config`),
so that ``save_pretrained`` (and so every ``Trainer`` checkpoint) writes a qft checkpoint too.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel
from transformers.core_model_loading import ConversionOps
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
from qft.nn.targets import find_target_linears

logger = logging.getLogger(__name__)


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

    def __init__(self, quantization_config, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self.planned = None  # (layers, report) planned from the files before loading, when the config streams

    def validate_environment(self, *args, **kwargs) -> None:
        if self.pre_quantized:
            check_quantization_config(self.quantization_config.to_dict(), "this checkpoint")
        elif not isinstance(self.quantization_config, QuantConfig):
            raise ValueError("quantize on load takes a qft config object (qft.LQLoRAConfig(...), qft.PEQAConfig(...), "
                             f"...), got {type(self.quantization_config).__name__}")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            self._plan(model, checkpoint_files)
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

    def _plan(self, model, checkpoint_files) -> None:
        """Plan every layer from the files (one target weight read at a time) when the config allows it."""
        from qft.prepare.quantize import plan_budget, streams
        from qft.prepare.streaming import FileTensors

        config = self.quantization_config
        files = [str(f) for f in checkpoint_files or []]
        if not streams(config) or not files or not all(f.endswith(".safetensors") for f in files):
            return  # loaded whole, then quantize_ runs on it
        tensors = FileTensors(files)
        targets = find_target_linears(model, config.target_modules, config.skip_modules)
        if any(f"{name}.weight" not in tensors for name in targets):  # the loader renames keys: let it
            logger.info("the checkpoint names its weights otherwise than the model: loading it whole, then quantizing")
            return
        with torch.device("cpu"):  # transformers builds the skeleton under a meta-device context; the layers are real
            self.planned = plan_budget(model, config, tensors=tensors, progress=False)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return self.planned is not None and param_name.removesuffix(".weight") in self.planned[0]

    def get_quantize_ops(self):
        return _DropPlanned()

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            mark_trainable(model)
            return model
        from qft.prepare.quantize import quantize_, swap_in  # the front door imports this module to mark what it prepares

        config = self.quantization_config
        if self.planned is not None:
            layers, report = self.planned
            self.planned = None
            return swap_in(model, config, layers, report)
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


class _DropPlanned(ConversionOps):
    """A target weight as transformers reads it: its layer is planned already, so a zero-size placeholder
    stands in for it until the layer is swapped in (nothing is missing, nothing is re-initialised)."""

    def convert(self, input_dict, source_patterns=None, target_patterns=None, **kwargs):
        return {key: torch.empty(0, dtype=(value[0] if isinstance(value, list) else value).dtype)
                for key, value in input_dict.items()}


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
