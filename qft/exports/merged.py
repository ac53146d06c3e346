"""Export for serving: every QLinear as compressed-tensors pack-quantized int-k.

A layer is written one of two ways:

- **Codes kept** (int-k layers without low-rank factors: PEQA, or plain int
  quantization): the packed codes, zero-points and (trained) scales go out
  unchanged, asymmetric, ``W = (q - zero) · scale`` — lossless. qft's int-k
  bit stream is compressed-tensors' dense packing (element i at bits
  [i·k, (i+1)·k) of the row), so ``weight_packed`` is qft's codes as they are;
  ``weight_zero_point`` is packed along the output dimension, as
  compressed-tensors packs it. A group that does not divide the input width
  (int4-g128 on SmolLM2's 576) is written with the largest group dividing both,
  each scale and zero-point repeated: the same weight.
- **Merged and re-quantized** (every other layer): W = dequant(Q) + (alpha/r)·B·A,
  then symmetric int4 per group, scales absmax / 7.5 and codes round(w / scale)
  clamped to [-8, 7], as compressed-tensors computes them; the group is the
  largest power of two from ``group_size`` down to MIN_GROUP that divides the
  input width, per channel when none does. ``rounding="gptq"`` picks the same codes'
  values with GPTQ instead (same scales; calibration Hessians gathered on a dense copy of the
  merged model, decoder layer by decoder layer, each layer seeing the ones before it as
  exported): plain rounding of W' loses much of what training gained (RESULTS.md).

``export_dense`` writes W' = dequant(Q) + scaling·B·A densely instead (bf16 by default), as
a plain transformers checkpoint: the hand-off to any other quantizer.

Every export is of the model's own class, each weight in its layer's own orientation (GPT-2's Conv1D
holds (in, out); the packed layout is (out, in) for every layer, and load_merged transposes it back). A
quantized output head tied to the input embeddings is untied (``tie_word_embeddings`` false, both
written): its quantized weight is no longer the embeddings.

The folder is what llm-compressor writes (W4A16 / W4A16_ASYM, format
"pack-quantized"), so vLLM and transformers with compressed-tensors can serve
it: per layer ``weight_packed`` (int32), ``weight_scale`` (out, groups),
``weight_shape`` (int64) and, when asymmetric, ``weight_zero_point``. One
config group per (bits, symmetric, group size), targeting layers by full
module name (compressed-tensors and vLLM match a plain target to a name only by
equality); ``ignore`` lists every other Linear of the model. 2-, 4- and 8-bit
layouts read the same in every compressed-tensors release; 3/5/6/7 bits need
the dense packing of current releases (0.20 is tested).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PretrainedConfig

from qft.files.atomic import atomic_dir
from qft.files.checkpoint import CheckpointError, recorded_class, shared_keys
from qft.methods import ROUNDINGS
from qft.methods.gptq import Grid, LayerwiseHessians, gptq, gptq_codes
from qft.nn import QFT_LAYERS, QLinear, qft_layers
from qft.nn.distributed import model_class
from qft.nn.qlinear import is_conv1d, oriented
from qft.nn.targets import is_linear
from qft.quant.formats import UniformInt
from qft.quant.formats.base import check_choice
from qft.quant.packing import pack, unpack
from qft.quant.tensor import QuantizedTensor

logger = logging.getLogger(__name__)

COMPRESSED_TENSORS_VERSION = "0.12.2"  # the config layout written (newer releases read it)
MIN_GROUP = 16  # smaller groups cost more than a bit per weight in scales: such layers go per channel
MERGED_BITS = 4


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors config group: int ``bits``, symmetric or not, ``group`` (None: per channel)."""

    bits: int
    symmetric: bool
    group: int | None

    def weights(self) -> dict:
        return {"actorder": None, "block_structure": None, "dynamic": False, "group_size": self.group,
                "num_bits": self.bits, "observer": "minmax", "observer_kwargs": {},
                "strategy": "channel" if self.group is None else "group", "symmetric": self.symmetric,
                "type": "int"}


def group_for(in_features: int, group_size: int) -> int | None:
    """The largest power of two from ``group_size`` down to MIN_GROUP that divides ``in_features``,
    or None (per channel) when none does."""
    g = group_size
    while g >= MIN_GROUP:
        if in_features % g == 0:
            return g
        g //= 2
    return None


def quantize_symmetric(w: torch.Tensor, group: int, dtype: torch.dtype,
                       bits: int = MERGED_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int-k per group, as compressed-tensors computes it: (int8 codes in [-2^(k-1), 2^(k-1)),
    scales absmax / (2^(k-1) - 0.5) in ``dtype``); int4: absmax / 7.5, codes in [-8, 7]."""
    rows, cols = w.shape
    top = 1 << bits - 1
    blocks = w.float().reshape(rows, cols // group, group)
    scale = (blocks.abs().amax(dim=-1) / (top - 0.5)).to(dtype)
    scale = torch.where(scale == 0, torch.finfo(dtype).eps, scale)
    q = torch.round(blocks / scale.float()[..., None]).clamp(-top, top - 1).to(torch.int8)
    return q.reshape(rows, cols), scale


def pack_signed(q: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' pack_to_int32 along rows: signed codes stored as q + 2^(bits-1), densely."""
    return pack((q.to(torch.int16) + (1 << bits - 1)).to(torch.uint8), bits)


def unpack_signed(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_signed`: int16 codes in [-2^(bits-1), 2^(bits-1))."""
    return unpack(packed, bits, cols, dtype=torch.int16) - (1 << bits - 1)


def compressed_tensors_config(groups: dict[Scheme, list[str]], ignore: list[str]) -> dict:
    """The quantization_config: one config group per scheme, in a fixed order."""
    order = sorted(groups, key=lambda s: (s.bits, s.symmetric, -(s.group or 0)))
    config_groups = {
        f"group_{i}": {"format": "pack-quantized", "input_activations": None, "output_activations": None,
                       "targets": groups[scheme], "weights": scheme.weights()}
        for i, scheme in enumerate(order)
    }
    return {
        "config_groups": config_groups, "format": "pack-quantized", "global_compression_ratio": None,
        "ignore": ignore, "kv_cache_scheme": None, "quant_method": "compressed-tensors",
        "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


def keeps_codes(layer: nn.Module) -> bool:
    """Whether the layer's own int-k codes are exported unchanged (no low-rank part to merge)."""
    return isinstance(layer, QLinear) and isinstance(layer.weight.format, UniformInt) and layer.lora_A is None


def _codes_of(weight: QuantizedTensor, dtype: torch.dtype) -> tuple[Scheme, dict[str, torch.Tensor]]:
    """An int-k weight's codes, zero-points and scales as they are (groups split to divide the width)."""
    fmt, rows, cols = weight.format, weight.rows, weight.cols
    _, zero = fmt.decode_scales(weight.tensors, rows, cols)
    scale = weight.tensors["scale"].detach()  # the stored (trained) scale, in its own dtype
    group = None if fmt.group_size is None or fmt.group_size >= cols else math.gcd(fmt.group_size, cols)
    if group is not None and group != fmt.group_size:
        repeat, n = fmt.group_size // group, cols // group
        scale = scale.repeat_interleave(repeat, dim=1)[:, :n]
        zero = zero.repeat_interleave(repeat, dim=1)[:, :n]
    tensors = {
        "weight_packed": weight.codes,
        "weight_scale": scale.to(dtype),
        "weight_zero_point": pack(zero.t().to(torch.uint8), fmt.bits).t(),
    }
    return Scheme(fmt.bits, False, group), tensors


def export_config(model: nn.Module) -> PretrainedConfig:
    """A copy of ``model``'s config for a plain model of its own class: no qft quantization_config, and untied
    when the output head is a qft layer (its quantized weight is no longer the input embeddings; a tied reader
    would load one over the other)."""
    config = type(model.config).from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [model_class(model).__name__]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, QFT_LAYERS) and getattr(config, "tie_word_embeddings", False):
        logger.info("the output head is quantized: the export unties it from the input embeddings")
        config.tie_word_embeddings = False
    return config


def _exact_in(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return torch.equal(t.detach().to(dtype).to(t.dtype), t.detach())


def _merged(weight: torch.Tensor, group_size: int, dtype: torch.dtype, hessian: torch.Tensor | None = None, *,
            symmetric: bool = True, act_order: bool = False) -> tuple[Scheme, dict[str, torch.Tensor]]:
    """W' re-quantized to int4, symmetric (absmax) or asymmetric (min-max with a zero-point, qft's int4
    format): round to nearest, or GPTQ under ``hessian`` on the same scales."""
    cols = weight.shape[1]
    group = group_for(cols, group_size)
    if not symmetric:
        fmt = UniformInt(MERGED_BITS, group)
        q = QuantizedTensor.quantize(weight, fmt) if hessian is None else gptq(weight, fmt, hessian, act_order=act_order)
        return _codes_of(q, dtype)
    q, scale = quantize_symmetric(weight, group or cols, dtype)
    if hessian is not None:
        top = 1 << MERGED_BITS - 1
        levels = torch.arange(-top, top, device=weight.device)
        grid = Grid(levels.float(), torch.arange(2 * top, device=weight.device).to(torch.uint8),
                    scale.float(), None, group or cols)
        q = (gptq_codes(weight, grid, hessian, act_order=act_order).to(torch.int16) - top).to(torch.int8)
    return Scheme(MERGED_BITS, True, group), {"weight_packed": pack_signed(q, MERGED_BITS), "weight_scale": scale}


def export_merged(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer=None,
    *,
    group_size: int = 128,
    dtype: torch.dtype | None = None,
    rounding: str = "rtn",
    calibration: list[str] | None = None,
    symmetric: bool = True,
    act_order: bool = True,
    progress: bool = True,
) -> Path:
    """Write ``model`` for serving in the compressed-tensors pack-quantized layout (see the module doc).

    dtype: of the scales and the unquantized weights. Default: float32 when every layer keeps its
      int-k codes (PEQA): the export then gives exactly the trained model's fp32 logits; bfloat16
      otherwise. vLLM's int kernels take fp16/bf16 scales: pass one, and trained scales are rounded to it.
    group_size: the largest group of re-quantized layers (a power of two, at least MIN_GROUP).
    rounding: of the re-quantized layers: "rtn" (round to nearest) or "gptq" (over ``calibration``
      texts, default the embedded corpus's train split; needs ``tokenizer``).
    symmetric: re-quantized layers as compressed-tensors' W4A16 (absmax scales, no zero-point) or, False,
      W4A16_ASYM (min-max scales and a zero-point per group; closer to W', RESULTS.md).
    act_order: with GPTQ, visit columns by decreasing Hessian diagonal (scales stay the static groups');
      on SmolLM2 it takes the symmetric export from 15.43 to 14.00 (RESULTS.md).
    """
    if group_size < MIN_GROUP or group_size & (group_size - 1):
        raise ValueError(f"group_size={group_size}: use a power of two of at least {MIN_GROUP} (e.g. 128)")
    layers = qft_layers(model)
    if not layers:
        raise ValueError("the model has no qft layer; export_merged writes models prepared or loaded by qft")
    if dtype is None:
        dtype = torch.float32 if all(keeps_codes(m) for m in layers.values()) else torch.bfloat16
    ignore = [n for n, m in model.named_modules() if is_linear(m) and n not in layers]
    state = model.state_dict()
    shared = shared_keys(state)
    out: dict[str, torch.Tensor] = {}
    groups: dict[Scheme, list[str]] = {}
    for key, value in state.items():
        module = key.rpartition(".")[0]
        if key in shared or module in layers:
            continue
        out[key] = value.to(dtype) if value.is_floating_point() else value

    def round_one(name: str, weight: torch.Tensor, hessian: torch.Tensor | None):
        scheme, tensors = _merged(weight, group_size, dtype, hessian, symmetric=symmetric, act_order=act_order)
        state = {f"{name}.{k}": v for k, v in tensors.items()}
        state[f"{name}.weight_shape"] = torch.tensor(weight.shape)
        return (scheme, tensors), _dequantized(Path(directory), name, scheme, state)

    merged_names = [n for n, m in layers.items() if not keeps_codes(m)]
    rounded = dict(rounded_once(model, merged_names, round_one, rounding=rounding, tokenizer=tokenizer,
                                calibration=calibration, progress=progress))
    for name, layer in layers.items():
        scheme, tensors = _codes_of(layer.weight, dtype) if keeps_codes(layer) else rounded.pop(name)
        groups.setdefault(scheme, []).append(name)
        out.update({f"{name}.{k}": v for k, v in tensors.items()})
        out[f"{name}.weight_shape"] = torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)
        if layer.bias is not None:
            out[f"{name}.bias"] = layer.bias.to(dtype)
    inexact = [n for n, m in layers.items() if keeps_codes(m) and not _exact_in(m.weight.tensors["scale"], dtype)]
    if inexact:
        logger.warning("the scales of %d int-k layers (e.g. %s) are rounded to %s, so the export is close to, "
                       "not exactly, the trained model; export in float32 for that", len(inexact), inexact[0], dtype)
    merged = {n: group_for(m.in_features, group_size) for n, m in layers.items() if not keeps_codes(m)}
    if set(merged.values()) - {group_size, None}:
        logger.info("group size %d does not divide every input width; re-quantized layers use groups %s",
                    group_size, sorted({g for g in merged.values() if g}))
    if None in merged.values():
        logger.warning("no power of two from %d down to %d divides the input width of %s; "
                       "these layers are written per channel (one scale per output row)", group_size, MIN_GROUP,
                       [n for n, g in merged.items() if g is None])
    plain = export_config(model)
    with torch.device("meta"):  # the model's own layer types, to name the Conv1D ones
        skeleton = model_class(model)._from_config(plain)
    conv1d = [n for n in layers if is_conv1d(skeleton.get_submodule(n))]
    if conv1d:
        logger.warning("%d quantized layers (e.g. %s) are Conv1D, which transformers' compressed-tensors loader "
                       "does not quantize (it leaves them random); read this export with qft.load_merged",
                       len(conv1d), conv1d[0])
    config = plain.to_dict()
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


def rounded_once(model: nn.Module, names: list[str], round_one: Callable, *, rounding: str, tokenizer=None,
                 calibration: list[str] | None = None, progress: bool = True) -> Iterator[tuple[str, object]]:
    """(name, result) for each qft layer of ``names``, in module order: ``round_one(name, W', hessian)``
    rounds the merged weight W' = dequant(Q) + scaling·B·A once and returns (result, the weight a reader
    will compute from it). ``rounding="rtn"`` passes no Hessian; ``"gptq"`` passes each layer's, gathered on
    a dense merged copy of the model in which every earlier layer already holds its rounded weight."""
    check_choice("rounding", rounding, ROUNDINGS)
    if rounding == "gptq" and tokenizer is None:
        raise ValueError("rounding='gptq' needs the tokenizer to read the calibration text (tokenizer=...)")
    layers = qft_layers(model)
    hessians = dense = None
    if rounding == "gptq" and names:
        dense = dense_model(model, torch.float32, merged=True).to(next(model.parameters()).device)
        hessians = LayerwiseHessians(dense, tokenizer, names, calibration, progress=progress)
    try:
        for name in names:
            hessian = None if hessians is None else hessians.hessian(name)
            result, weight = round_one(name, layers[name].merged_weight(), hessian)
            if dense is not None:  # later layers calibrate on this one as a reader will compute it
                target = dense.get_submodule(name)
                with torch.no_grad():
                    target.weight.copy_(oriented(target, weight))
            yield name, result
    finally:
        if hessians is not None:
            hessians.close()


def dense_model(model: nn.Module, dtype: torch.dtype, *, merged: bool) -> nn.Module:
    """A plain transformers model of ``model``'s own class (no qft layers) in ``dtype``: every qft layer
    becomes the model's own nn.Linear (or Conv1D) holding W' = dequant(Q) + scaling·B·A (``merged``) or
    dequant(Q) alone (a HALO layer: its weight, or its 8-bit base + B·A)."""
    layers = qft_layers(model)
    dense = model_class(model)._from_config(export_config(model), dtype=dtype)
    state = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in layers}
    for name, layer in layers.items():
        weight = layer.merged_weight() if merged else layer.base_weight()
        state[f"{name}.weight"] = oriented(dense.get_submodule(name), weight)
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = dense.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in shared_keys(dense.state_dict())]
    if missing or unexpected:
        raise ValueError(f"this model does not map onto a plain {type(dense).__name__}: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    dense.tie_weights()
    return dense.eval()


def export_dense(model: nn.Module, directory: str | os.PathLike, tokenizer=None, *,
                 dtype: torch.dtype = torch.bfloat16) -> Path:
    """W' = dequant(Q) + scaling·B·A for every QLinear, written densely as a plain transformers checkpoint
    (``dtype``, bf16 by default): the hand-off to another quantizer (llm-compressor, GPTQModel, llama.cpp)."""
    if not qft_layers(model):
        raise ValueError("the model has no qft layer; export_dense writes models prepared or loaded by qft")
    dense = dense_model(model, dtype, merged=True)
    with atomic_dir(directory) as tmp:
        dense.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)


def _schemes(directory: Path, qconfig: dict) -> dict[str, Scheme]:
    """Module name -> scheme, from the config groups (targets are full module names, as qft writes them)."""
    schemes = {}
    for group in qconfig.get("config_groups", {}).values():
        w = group.get("weights") or {}
        if w.get("type") != "int" or w.get("strategy") not in ("group", "channel"):
            raise CheckpointError(f"{directory}: load_merged reads int group/channel weights as qft writes them, "
                                  f"not {w}; load this model with transformers and compressed-tensors")
        scheme = Scheme(int(w["num_bits"]), bool(w.get("symmetric", True)),
                        w.get("group_size") if w.get("strategy") == "group" else None)
        schemes.update({target: scheme for target in group.get("targets", [])})
    return schemes


def _dequantized(directory: Path, name: str, scheme: Scheme, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """(q - zero) · scale in the scale's dtype, as compressed-tensors computes it."""
    rows, cols = state.pop(f"{name}.weight_shape").tolist()
    scale = state.pop(f"{name}.weight_scale")
    packed = state.pop(f"{name}.weight_packed")
    if scale.shape[0] != rows or cols % scale.shape[1]:
        raise CheckpointError(f"{directory}: {name}.weight_scale has shape {tuple(scale.shape)}, "
                              f"which does not fit a ({rows}, {cols}) weight; re-export the model")
    q = unpack(packed, scheme.bits, cols, dtype=torch.int16)
    if scheme.symmetric:
        q = q - (1 << scheme.bits - 1)
    else:
        zero = unpack(state.pop(f"{name}.weight_zero_point").t().contiguous(), scheme.bits, rows, dtype=torch.int16).t()
        q = q - zero.repeat_interleave(cols // scale.shape[1], dim=1)
    group = cols // scale.shape[1]  # cols when per channel
    return (q.reshape(rows, -1, group).to(scale.dtype) * scale[..., None]).reshape(rows, cols)


def load_merged(directory: str | os.PathLike) -> nn.Module:
    """Read a pack-quantized export back into a plain float model (to evaluate it without
    compressed-tensors): every packed layer becomes the model's own nn.Linear (or Conv1D) holding the
    dequantized weight."""
    import transformers

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("quant_method") != "compressed-tensors" or qconfig.get("format") != "pack-quantized":
        raise CheckpointError(f"{directory} is not a compressed-tensors pack-quantized export")
    schemes = _schemes(directory, qconfig)
    hf_config = transformers.AutoConfig.from_pretrained(directory)
    del hf_config.quantization_config
    dtype = getattr(torch, config.get("dtype") or "float32")
    cls = recorded_class(config)
    if cls is transformers.AutoModelForCausalLM:  # an export written before qft named the architecture
        model = cls.from_config(hf_config, dtype=dtype)
    else:
        model = cls._from_config(hf_config, dtype=dtype)
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    for key in [k for k in state if k.endswith(".weight_packed")]:
        name = key.removesuffix(".weight_packed")
        if name not in schemes:
            raise CheckpointError(f"{directory}: {name} is packed but no config group targets it; re-export the model")
        weight = _dequantized(directory, name, schemes[name], state)
        state[f"{name}.weight"] = oriented(model.get_submodule(name), weight)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in shared_keys(model.state_dict())]
    if missing or unexpected:
        raise CheckpointError(f"{directory}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval()
