"""qft checkpoints: a Hugging Face model folder whose quantized layers stay packed.

    folder/config.json          the model's config + quantization_config {"quant_method": "qft", ...}
    folder/model.safetensors    packed codes, stored scales, low-rank factors, everything else as is
    folder/tokenizer*, generation_config.json

``quantization_config["modules"]`` lists every QLinear (format, shape, rank,
bias, trainable scales), which is all it takes to rebuild empty layers that the
file then fills. Loading checks the whole file against that list before it
touches the model, so a truncated file, a missing tensor or a checkpoint of
another format version is an error, never a half-loaded model. The folder is
written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from qft.atomic import atomic_dir
from qft.nn import QLinear
from qft.targets import set_module
from qft.tensor import QuantizedTensor

logger = logging.getLogger(__name__)

QUANT_METHOD = "qft"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
           "I64": torch.int64, "U8": torch.uint8, "I8": torch.int8, "F64": torch.float64}


class CheckpointError(ValueError):
    """The folder is not a complete qft checkpoint this version can read."""


def module_specs(model: nn.Module) -> dict[str, dict]:
    """What it takes to rebuild each QLinear of ``model`` as an empty layer."""
    specs = {}
    for name, m in model.named_modules():
        if isinstance(m, QLinear):
            specs[name] = {
                "format": m.format.name,
                "shape": [m.out_features, m.in_features],
                "rank": m.rank,
                "bias": None if m.bias is None else str(m.bias.dtype).removeprefix("torch."),
                "train_scales": m.scale is not None,
            }
    return specs


def empty_qlinear(spec: dict) -> QLinear:
    """A QLinear with the layout ``spec`` describes and zeros everywhere (a checkpoint fills it)."""
    out_features, in_features = spec["shape"]
    rank = spec["rank"]
    bias = None if spec["bias"] is None else torch.zeros(out_features, dtype=getattr(torch, spec["bias"]))
    return QLinear(
        QuantizedTensor.empty(spec["format"], (out_features, in_features)), bias, rank=rank,
        lora_a=torch.zeros(rank, in_features) if rank else None,
        lora_b=torch.zeros(out_features, rank) if rank else None,
        train_scales=spec["train_scales"],
    )


def swap_in_empty_layers(model: nn.Module, specs: dict[str, dict]) -> None:
    for name, spec in specs.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the checkpoint quantizes {name}, which this model does not have") from None
        if getattr(old, "in_features", None) is not None and [old.out_features, old.in_features] != spec["shape"]:
            raise CheckpointError(f"{name} is {[old.out_features, old.in_features]} in the model, "
                                  f"{spec['shape']} in the checkpoint")
        set_module(model, name, empty_qlinear(spec))


def shared_keys(state: dict[str, torch.Tensor]) -> set[str]:
    """Keys whose tensor is the same storage as an earlier key's (tied embeddings)."""
    seen, shared = {}, set()
    for k, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            shared.add(k)
        seen.setdefault(key, k)
    return shared


def quantization_config(model: nn.Module) -> dict:
    from qft import __version__

    config = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "qft_version": __version__,
              "modules": module_specs(model)}
    report = getattr(model, "qft_report", None)
    if report is not None:
        config["report"] = {"method": report.method, "budget": report.budget, "rank": report.rank,
                            "fisher": report.fisher, "bits": report.bits,
                            "bits_with_low_rank": report.bits_with_low_rank}
    else:  # a loaded checkpoint keeps the report it was written with
        loaded = getattr(model.config, "quantization_config", None)
        loaded = loaded.to_dict() if hasattr(loaded, "to_dict") else loaded or {}
        if loaded.get("quant_method") == QUANT_METHOD and "report" in loaded:
            config["report"] = loaded["report"]
    return config


def save_quantized(model: nn.Module, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``model`` (with its QLinear layers packed) and ``tokenizer`` to ``directory``."""
    specs = module_specs(model)
    if not specs:
        raise ValueError("the model has no QLinear layer; call qft.quantize_and_prepare(model) before saving")
    state = model.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in shared_keys(state)}
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(model)
    with atomic_dir(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "qft_format_version": str(FORMAT_VERSION)})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    logger.info("saved %d quantized layers to %s", len(specs), directory)
    return Path(directory)


def read_config(directory: str | os.PathLike) -> dict:
    """config.json of a qft checkpoint, after checking that it is one this version reads."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json: not a checkpoint folder")
    config = json.loads(path.read_text())
    check_quantization_config(config.get("quantization_config"), directory)
    return config


def check_quantization_config(qconfig, where) -> None:
    method = (qconfig or {}).get("quant_method")
    if method != QUANT_METHOD:
        raise CheckpointError(
            f"{where} is not a qft checkpoint (quant_method {method!r}); load it with "
            "transformers.AutoModelForCausalLM.from_pretrained and quantize it with qft.quantize_and_prepare"
        )
    version = qconfig.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{where} was written in qft checkpoint format {version!r} (by qft {qconfig.get('qft_version')}); "
            f"this qft reads format {FORMAT_VERSION}: install the qft version that wrote it"
        )


def tensor_layout(path: str | os.PathLike) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor in a safetensors file, read from its header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (_DTYPES.get(f.get_slice(k).get_dtype()), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({e}); write or copy it again") from None


def check_tensors(found: dict, expected: dict[str, torch.Tensor], optional: set[str], modules, where) -> None:
    """Every expected tensor present with its shape, nothing unknown; the quantized ``modules``'
    tensors also with their exact dtype (other float tensors may come in any precision)."""
    missing = sorted(set(expected) - set(found) - optional)
    unknown = sorted(set(found) - set(expected))
    if missing or unknown:
        raise CheckpointError(f"{where} does not match its config: missing tensors {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}, unknown tensors {unknown[:5]}")
    for k, (dtype, shape) in found.items():
        want = expected[k]
        exact = k.rpartition(".")[0] in modules or not want.is_floating_point()
        if shape != tuple(want.shape) or (exact and dtype != want.dtype):
            raise CheckpointError(f"{where}: {k} is {dtype} {shape}, expected {want.dtype} {tuple(want.shape)}")


def load_quantized(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model written by :func:`save_quantized`: same tensors, same logits bit for bit.

    The low-rank factors (and trainable scales) require grad, everything else is frozen;
    the model is in eval mode. The tokenizer: ``AutoTokenizer.from_pretrained(directory)``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    qconfig = read_config(directory)["quantization_config"]
    found = tensor_layout(directory / WEIGHTS)
    config = AutoConfig.from_pretrained(directory)
    del config.quantization_config  # the model is built plain, then its layers are swapped
    model = AutoModelForCausalLM.from_config(config)
    swap_in_empty_layers(model, qconfig["modules"])
    expected = model.state_dict()
    check_tensors(found, expected, shared_keys(expected), qconfig["modules"], directory / WEIGHTS)
    with safe_open(str(directory / WEIGHTS), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict(state, strict=False, assign=True)  # assign: every tensor keeps the file's dtype
    model.tie_weights()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("lora_A", "lora_B", ".scale")))
    model.config.quantization_config = qconfig
    return model.to(device).eval()


def checkpoint_sizes(directory: str | os.PathLike) -> dict[str, int]:
    """Bytes on disk by part: quantized weights (codes + scales), low-rank factors, the rest, the file."""
    directory = Path(directory)
    modules = read_config(directory)["quantization_config"]["modules"]
    sizes = {"quantized": 0, "low_rank": 0, "other": 0, "parameters_quantized": 0}
    for name, (dtype, shape) in tensor_layout(directory / WEIGHTS).items():
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        module, _, leaf = name.rpartition(".")
        if module in modules and leaf.startswith("weight_") and leaf not in ("weight_shape", "weight_format"):
            sizes["quantized"] += nbytes
        elif module in modules and leaf in ("lora_A", "lora_B"):
            sizes["low_rank"] += nbytes
        else:
            sizes["other"] += nbytes
    sizes["parameters_quantized"] = sum(s["shape"][0] * s["shape"][1] for s in modules.values())
    sizes["file"] = (directory / WEIGHTS).stat().st_size
    return sizes
