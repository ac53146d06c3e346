"""qft checkpoints: a Hugging Face model folder whose quantized layers stay packed.

    folder/config.json          the model's config + quantization_config {"quant_method": "qft", ...}
    folder/model.safetensors    packed codes, stored scales, adapters, everything else
                                (or model-0000k-of-0000n.safetensors + model.safetensors.index.json)
    folder/tokenizer*, generation_config.json

``quantization_config["modules"]`` lists every QLinear (format, shape, logical
dtype, rank, alpha, bias, trainable scales, and the dtype of every stored
tensor), which is all it takes to rebuild empty layers that the files then fill. Loading checks the whole file against that list before it
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

from qft.files.atomic import atomic_dir
from qft.nn import LAYERS, distributed, mark_trainable, qft_layers, tied_names
from qft.nn.targets import set_module

logger = logging.getLogger(__name__)

QUANT_METHOD = "qft"
FORMAT_VERSION = 2  # 2: per-tensor dtypes recorded, alpha in the config, the weight as one QuantizedTensor
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
           "I64": torch.int64, "U8": torch.uint8, "I8": torch.int8, "F64": torch.float64,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class CheckpointError(ValueError):
    """The folder is not a complete qft checkpoint this version can read."""


def module_specs(model: nn.Module) -> dict[str, dict]:
    """What it takes to rebuild each qft layer of ``model`` (QLinear, HaloLinear) as an empty layer (a
    layer that sits at several places, tied, is described once and the others say ``same_as``)."""
    layers = qft_layers(model, every_name=True)
    tied = tied_names(layers)
    return {name: {"same_as": tied[name]} if name in tied else m.spec() for name, m in layers.items()}


def swap_in_empty_layers(model: nn.Module, specs: dict[str, dict]) -> None:
    """Put an empty qft layer (on the current default device) at every place ``specs`` lists."""
    for name, spec in specs.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the checkpoint quantizes {name}, which this model does not have") from None
        if "same_as" in spec:
            set_module(model, name, model.get_submodule(spec["same_as"]))
            continue
        if getattr(old, "in_features", None) is not None and [old.out_features, old.in_features] != spec["shape"]:
            raise CheckpointError(f"{name} is {[old.out_features, old.in_features]} in the model, "
                                  f"{spec['shape']} in the checkpoint")
        kind = spec.get("layer", "qlinear")  # format version 2 wrote QLinear specs without a "layer"
        if kind not in LAYERS:
            raise CheckpointError(f"{name} is a {kind!r} layer, which this qft version does not know; "
                                  f"it reads {sorted(LAYERS)} (update qft)")
        set_module(model, name, LAYERS[kind].empty(spec))


def shared_keys(state: dict[str, torch.Tensor]) -> set[str]:
    """Keys whose tensor is the same storage as an earlier key's (tied embeddings)."""
    seen, shared = {}, set()
    for k, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            shared.add(k)
        seen.setdefault(key, k)
    return shared


def tied_layer_keys(state: dict, specs: dict[str, dict]) -> set[str]:
    """State keys of layers that are another layer (``same_as``). They are stored again under their own
    name (transformers' loader expects every key of the model's state dict); loading puts one layer
    object at both places."""
    prefixes = tuple(f"{n}." for n, s in specs.items() if "same_as" in s)
    return {k for k in state if prefixes and k.startswith(prefixes)}


def quantization_config(model: nn.Module) -> dict:
    from qft import __version__

    config = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "qft_version": __version__,
              "modules": module_specs(model)}
    report, made_by = getattr(model, "qft_report", None), getattr(model, "qft_config", None)
    if report is not None:
        config["report"] = {"method": report.method, "budget": report.budget, "rank": report.rank,
                            "fisher": report.fisher, "rounding": report.rounding, "bits": report.bits,
                            "bits_with_adapters": report.bits_with_adapters, "calibration": report.calibration}
    if made_by is not None:  # the config object quantize_ applied (qft.methods.config)
        config["config"] = made_by.to_dict()
    if report is None and made_by is None:  # a loaded checkpoint keeps what it was written with
        loaded = getattr(getattr(model, "config", None), "quantization_config", None)
        loaded = loaded.to_dict() if hasattr(loaded, "to_dict") else loaded or {}
        if loaded.get("quant_method") == QUANT_METHOD:
            config.update({k: loaded[k] for k in ("report", "config") if k in loaded})
    return config


def _shards(state: dict[str, torch.Tensor], max_shard_size: int | None) -> list[dict[str, torch.Tensor]]:
    if max_shard_size is None:
        return [state]
    shards, size = [{}], 0
    for k, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    return shards


def save_quantized(model: nn.Module, directory: str | os.PathLike, tokenizer=None, *,
                   dtype: torch.dtype | None = None, max_shard_size: int | None = None) -> Path:
    """Write ``model`` (with its QLinear layers packed) and ``tokenizer`` to ``directory``.

    dtype: store the float tensors that are not quantized (embeddings, norms, the output head) and the
      low-rank factors in this dtype (e.g. torch.bfloat16: a low-bit checkpoint is then small); default
      as they are. Packed codes and stored scales are always kept exactly.
    max_shard_size: bytes per file; above it the tensors go into several files plus an index,
      as ``save_pretrained`` writes them.
    A model under ``qft.shard`` (FSDP2) or ``qft.replicate`` (DDP): call this on every rank; the
    model is gathered and rank 0 writes one ordinary checkpoint.
    """
    if distributed.is_sharded(model) or distributed.is_replicated(model):
        # every rank calls this: the model is gathered, rank 0 writes, the others wait for it
        model = distributed.unwrap(model)
        with distributed.gathered(model):
            if distributed.world()[0] == 0:
                _save(model, directory, tokenizer, dtype, max_shard_size)
        torch.distributed.barrier()
        return Path(directory)
    return _save(model, directory, tokenizer, dtype, max_shard_size)


def checkpoint_contents(model: nn.Module, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors a qft checkpoint of ``model`` stores (the other float tensors and the low-rank factors cast
    to ``dtype`` if given) and its quantization_config, which records the dtype of every stored tensor.
    save_quantized and transformers' save_pretrained (through the "qft" quantizer) both write these."""
    config = quantization_config(model)
    specs = config["modules"]
    if not specs:
        raise ValueError("the model has no qft layer; call qft.quantize_and_prepare(model) before saving")
    state = distributed.state_dict(model)
    again = tied_layer_keys(state, specs)
    drop = shared_keys(state) - again
    out = {}
    for k, v in state.items():
        if k in drop:
            continue
        if k in again:
            v = v.clone()  # safetensors stores no two names on one storage
        module, _, leaf = k.rpartition(".")
        castable = v.is_floating_point() and (module not in specs or leaf in ("lora_A", "lora_B"))
        out[k] = (v.to(dtype) if dtype is not None and castable else v).detach().contiguous().cpu()
    for name, spec in specs.items():  # the spec records what is stored
        for leaf in spec.get("dtypes", {}):
            if f"{name}.{leaf}" in out:
                spec["dtypes"][leaf] = str(out[f"{name}.{leaf}"].dtype).removeprefix("torch.")
    return out, config


def _save(model: nn.Module, directory, tokenizer, dtype, max_shard_size) -> Path:
    out, qconfig = checkpoint_contents(model, dtype)
    config = model.config.to_dict()
    # the dtype the other float tensors are stored in, which from_pretrained(dtype="auto") loads them in
    config["dtype"] = str(dtype or model.dtype).removeprefix("torch.")
    config["architectures"] = [distributed.model_class(model).__name__]
    config["quantization_config"] = qconfig
    shards = _shards(out, max_shard_size)
    metadata = {"format": "pt", "qft_format_version": str(FORMAT_VERSION)}
    with atomic_dir(directory) as tmp:
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS), metadata=metadata)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / file), metadata=metadata)
                weight_map.update(dict.fromkeys(shard, file))
            total = sum(t.numel() * t.element_size() for t in out.values())
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    logger.info("saved %d quantized layers to %s", len(qconfig["modules"]), directory)
    return Path(directory)


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model folder (a qft checkpoint, or any model saved with safetensors):
    the shards its index lists, else its one file."""
    directory = Path(directory)
    if (directory / INDEX).is_file():
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
    elif (directory / WEIGHTS).is_file():
        files = [directory / WEIGHTS]
    else:
        raise CheckpointError(f"{directory} holds neither {WEIGHTS} nor {INDEX}: qft reads a model folder written "
                              "by save_pretrained(safe_serialization=True); copy the whole folder again")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f} is missing; copy the whole checkpoint folder again")
    return files


def folder_layout(directory: str | os.PathLike) -> dict[Path, dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    """Each safetensors file of a model folder (:func:`weight_files`: its index honoured) -> name -> (dtype,
    shape) of its tensors, from the headers only; a truncated or foreign file is a CheckpointError."""
    return {f: tensor_layout(f) for f in weight_files(directory)}


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
        raise CheckpointError(f"{path} is truncated or not a readable safetensors file ({e}); write or copy it "
                              "again") from None


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
    """Rebuild a model written by :func:`save_quantized`: same tensors and dtypes, same logits bit for bit.

    The model is built on the meta device by transformers (the registered "qft" quantizer swaps in
    empty QLinear layers and checks every file before anything is loaded). The adapters require
    grad, everything else is frozen; the model is in eval mode. The tokenizer:
    ``AutoTokenizer.from_pretrained(directory)``.
    """
    directory = Path(directory)
    config = read_config(directory)
    folder_layout(directory)  # a truncated file fails here, with qft's message
    model = recorded_class(config).from_pretrained(directory, dtype="auto")
    mark_trainable(model)
    return model.to(device).eval()


def recorded_class(config: dict) -> type:
    """The transformers class a folder's config.json names in ``architectures`` (AutoModelForCausalLM
    for a folder that names none, or a class this transformers lacks)."""
    import transformers

    architecture = (config.get("architectures") or [None])[0]
    return getattr(transformers, architecture or "", None) or transformers.AutoModelForCausalLM


def checkpoint_sizes(directory: str | os.PathLike) -> dict[str, int]:
    """Bytes on disk by part: quantized weights (codes + scales), low-rank factors, the rest, the file."""
    directory = Path(directory)
    modules = read_config(directory)["quantization_config"]["modules"]
    modules = {n: s for n, s in modules.items() if "same_as" not in s}
    sizes = {"quantized": 0, "low_rank": 0, "other": 0, "parameters_quantized": 0}
    layouts = folder_layout(directory)
    layout = {k: v for file_layout in layouts.values() for k, v in file_layout.items()}
    for name, (dtype, shape) in layout.items():
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        module, _, leaf = name.rpartition(".")
        if module in modules and leaf.startswith("weight_") and leaf not in ("weight_shape", "weight_format"):
            sizes["quantized"] += nbytes
        elif module in modules and leaf in ("lora_A", "lora_B"):
            sizes["low_rank"] += nbytes
        else:
            sizes["other"] += nbytes
    sizes["parameters_quantized"] = sum(s["shape"][0] * s["shape"][1] for s in modules.values())
    sizes["file"] = sum(f.stat().st_size for f in layouts)
    return sizes
