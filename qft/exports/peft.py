"""Adapters that travel: a qft model's low-rank parts as a PEFT LoRA adapter, plus its base.

``export_peft(model, dir)`` writes what transformers + PEFT load without qft:

- ``dir/adapter_model.safetensors`` and ``dir/adapter_config.json``: every QLinear's factors under
  PEFT's names (``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``), ``r`` and
  ``lora_alpha`` of the most common layer, ``rank_pattern`` / ``alpha_pattern`` (anchored,
  escaped full module names) for the others, so that PEFT's scaling lora_alpha / r equals qft's.
- ``dir/base/``: the base the adapter applies to, as PEFT does for LoftQ and PiSSA residual bases:
  a plain transformers checkpoint whose quantized layers hold dequant(Q) (trained scales included)
  in the model's dtype. Load it with ``AutoModelForCausalLM.from_pretrained(dir / "base")`` and
  wrap it with ``PeftModel.from_pretrained(base, dir)``: the logits are the qft model's within
  floating-point tolerance (the dense matmul rounds differently from qft's dequant-matmul).

GPT-2's Conv1D layers keep their (in, out) base weight and the adapter says ``fan_in_fan_out``, as PEFT
does for them (the factors are the same as for an nn.Linear). A quantized output head is untied from the
input embeddings in the base (:func:`qft.exports.merged.export_config`). A model with no low-rank factors (PEQA:
its adapter is the scales) is refused: export it with :func:`qft.export_merged`, which keeps its int codes.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qft.files.atomic import atomic_dir
from qft.exports.merged import dense_model
from qft.nn import QLinear, qft_layers
from qft.nn.qlinear import is_conv1d

BASE = "base"


def _peft_config(layers: dict[str, QLinear], base: nn.Module) -> dict:
    ranks = {name: layer.rank for name, layer in layers.items()}
    alphas = {name: layer.scaling * layer.rank for name, layer in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    key = re.escape  # PEFT matches a pattern key as a regex anchored at a dot and at the end
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if base.can_generate() else None,
        "base_model_name_or_path": None,
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": any(is_conv1d(base.get_submodule(n)) for n in layers),
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "target_modules": sorted(layers),
        "rank_pattern": {key(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {key(n): v for n, v in alphas.items() if v != alpha},
        "modules_to_save": None, "revision": None,
    }


def _check(model: nn.Module) -> dict[str, QLinear]:
    layers = qft_layers(model, (QLinear,))
    if not layers:
        raise ValueError("the model has no QLinear layer; export_peft writes models prepared or loaded by qft")
    without = [n for n, m in layers.items() if not m.rank]
    if without:
        raise ValueError(f"{len(without)} layers (e.g. {without[0]}) have no low-rank factors (a PEQA model's "
                         "adapter is its scales); PEFT's LoRA cannot hold them: use qft.export_merged")
    return layers


def export_peft(model: nn.Module, directory: str | os.PathLike, tokenizer=None, *,
                dtype: torch.dtype | None = None) -> Path:
    """Write ``model``'s low-rank factors as a PEFT LoRA adapter in ``directory`` and its base (the
    dequantized weights, in ``dtype``, default the embeddings') in ``directory/base``."""
    layers = _check(model)
    dtype = dtype or model.get_input_embeddings().weight.dtype
    tensors = {}
    for name, layer in layers.items():
        a = layer.unpooled_lora_A(layer.lora_A.dtype) if getattr(layer, "pool", 0) else layer.lora_A  # QA-LoRA's
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous()
    base = dense_model(model, dtype, merged=False)
    config = _peft_config(layers, base)
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        base.save_pretrained(tmp / BASE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / BASE)
            tokenizer.save_pretrained(tmp)
    return Path(directory)
