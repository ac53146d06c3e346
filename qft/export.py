"""Export for serving: merge each QLinear into one matrix and write compressed-tensors int4.

    W = dequant(Q) + (alpha / r) · B · A      then symmetric int4, one scale per group

The folder is what compressed-tensors (llm-compressor's W4A16, format
"pack-quantized") writes, so vLLM and transformers with compressed-tensors can
serve it: per layer ``weight_packed`` (int32, eight 4-bit codes per word, column
8k+j in bits 4j..4j+3, stored as q + 8), ``weight_scale`` (out, in/group) in the
model dtype, ``weight_shape`` (int64). Scales are absmax / 7.5 and codes
round(w / scale) clamped to [-8, 7], as compressed-tensors computes them.
compressed-tensors needs the group to divide the input width; a layer where
``group_size`` does not (SmolLM2's 576) gets the largest power-of-two group
down to 16 that does, and a layer that not even 16 divides is written per
channel (``weight_scale`` (out, 1)); each group size has its own config group.
Config groups target the exported layers by full module name (compressed-tensors
and vLLM match a plain target to a name only by equality), and ``ignore`` lists
every other Linear of the model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from qft.atomic import atomic_dir
from qft.checkpoint import CheckpointError, shared_keys
from qft.nn import QLinear

logger = logging.getLogger(__name__)

COMPRESSED_TENSORS_VERSION = "0.12.2"  # the config layout written (newer releases read it)
MIN_GROUP = 16  # smaller groups cost more than a bit per weight in scales: such layers go per channel


def group_for(in_features: int, group_size: int) -> int | None:
    """The largest power of two from ``group_size`` down to MIN_GROUP that divides ``in_features``,
    or None (per channel) when none does."""
    g = group_size
    while g >= MIN_GROUP:
        if in_features % g == 0:
            return g
        g //= 2
    return None


def quantize_int4(w: torch.Tensor, group: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 per group: (int8 codes in [-8, 7], scales in ``dtype``), as compressed-tensors."""
    rows, cols = w.shape
    blocks = w.float().reshape(rows, cols // group, group)
    scale = (blocks.abs().amax(dim=-1) / 7.5).to(dtype)
    scale = torch.where(scale == 0, torch.finfo(dtype).eps, scale)
    q = torch.round(blocks / scale.float()[..., None]).clamp(-8, 7).to(torch.int8)
    return q.reshape(rows, cols), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' pack_to_int32 for 4 bits: column 8k+j into word k at bits 4j, as q + 8."""
    rows, cols = q.shape
    u = (q.to(torch.int64) + 8).clamp(0, 15)
    pad = -cols % 8
    u = torch.nn.functional.pad(u, (0, pad)).reshape(rows, -1, 8)
    words = (u << (4 * torch.arange(8, device=q.device))).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 codes in [-8, 7], (rows, cols)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    nibbles = (words[..., None] >> (4 * torch.arange(8, device=packed.device))) & 0xF
    return (nibbles.reshape(packed.shape[0], -1)[:, :cols] - 8).to(torch.int8)


def compressed_tensors_config(groups: dict[int | None, list[str]], ignore: list[str]) -> dict:
    """The quantization_config: one config group per group size (None: per channel), largest first."""
    config_groups = {}
    for i, group in enumerate(sorted(groups, key=lambda g: -(g or 0))):
        config_groups[f"group_{i}"] = {
            "format": "pack-quantized",
            "input_activations": None,
            "output_activations": None,
            "targets": groups[group],
            "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": group,
                        "num_bits": 4, "observer": "minmax", "observer_kwargs": {},
                        "strategy": "channel" if group is None else "group", "symmetric": True, "type": "int"},
        }
    return {
        "config_groups": config_groups, "format": "pack-quantized", "global_compression_ratio": None,
        "ignore": ignore, "kv_cache_scheme": None, "quant_method": "compressed-tensors",
        "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


def export_merged(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer=None,
    *,
    group_size: int = 128,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write ``model`` with every QLinear merged and re-quantized to int4 (compressed-tensors layout).

    ``group_size`` (a power of two, at least MIN_GROUP) is the largest group used; see group_for.
    """
    if group_size < MIN_GROUP or group_size & (group_size - 1):
        raise ValueError(f"group_size={group_size}: use a power of two of at least {MIN_GROUP} (e.g. 128)")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    if not layers:
        raise ValueError("the model has no QLinear layer; export_merged writes models prepared or loaded by qft")
    ignore = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and n not in layers]
    state = model.state_dict()
    shared = shared_keys(state)
    out: dict[str, torch.Tensor] = {}
    groups: dict[int | None, list[str]] = {}
    for key, value in state.items():
        module = key.rpartition(".")[0]
        if key in shared or module in layers:
            continue
        out[key] = value.to(dtype) if value.is_floating_point() else value
    for name, layer in layers.items():
        group = group_for(layer.in_features, group_size)
        groups.setdefault(group, []).append(name)
        q, scale = quantize_int4(layer.merged_weight(), group or layer.in_features, dtype)
        out[f"{name}.weight_packed"] = pack_int4(q)
        out[f"{name}.weight_scale"] = scale
        out[f"{name}.weight_shape"] = torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)
        if layer.bias is not None:
            out[f"{name}.bias"] = layer.bias.to(dtype)
    smaller = {g: len(names) for g, names in groups.items() if g not in (group_size, None)}
    if smaller:
        logger.info("group size %d does not divide every input width; layers per smaller group: %s",
                    group_size, smaller)
    if None in groups:
        logger.warning("no power of two from %d down to %d divides the input width of %s; "
                       "these layers are written per channel (one scale per output row)",
                       group_size, MIN_GROUP, groups[None])
    config = model.config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = compressed_tensors_config(groups, ignore)
    with atomic_dir(directory) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in out.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)


def load_merged(directory: str | os.PathLike) -> nn.Module:
    """Read an int4 pack-quantized export back into a plain float model (to evaluate it without
    compressed-tensors): every packed layer becomes an nn.Linear holding the dequantized weight."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("quant_method") != "compressed-tensors" or qconfig.get("format") != "pack-quantized":
        raise CheckpointError(f"{directory} is not a compressed-tensors pack-quantized export")
    hf_config = AutoConfig.from_pretrained(directory)
    del hf_config.quantization_config
    dtype = getattr(torch, config.get("dtype") or "float32")
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    for key in [k for k in state if k.endswith(".weight_packed")]:
        name = key.removesuffix(".weight_packed")
        rows, cols = state.pop(f"{name}.weight_shape").tolist()
        scale = state.pop(f"{name}.weight_scale")
        q = unpack_int4(state.pop(key), cols)
        if scale.shape[0] != rows or cols % scale.shape[1]:
            raise CheckpointError(f"{directory}: {name}.weight_scale has shape {tuple(scale.shape)}, "
                                  f"which does not fit a ({rows}, {cols}) weight; re-export the model")
        group = cols // scale.shape[1]  # cols when per channel
        w = (q.reshape(rows, -1, group).to(scale.dtype) * scale[..., None]).reshape(rows, cols)
        state[f"{name}.weight"] = w
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in shared_keys(model.state_dict())]
    if missing or unexpected:
        raise CheckpointError(f"{directory}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval()
