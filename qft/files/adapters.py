"""Task adapters: only the trainable parts of a qft model, swappable on one shared base.

``save_adapter(model, folder)`` writes what trains in every qft layer (``qft.nn.QFT_LAYERS``: a
QLinear's ``lora_A``, ``lora_B`` and trainable ``scale``; a HaloLinear's ``lora_A`` and ``lora_B``
under HALO-PEFT, its ``weight`` and ``bias`` under full HALO fine-tuning) to
``adapter.safetensors`` plus ``adapter.json``, which names the method and a SHA-256 of the frozen
base (every state-dict tensor that is not an adapter: packed codes or HALO's 8-bit base, frozen
scales and zero-points, embeddings, norms, and the layer layout). ``load_adapter`` swaps them into
a model in place, and refuses an adapter made for another base or method, or a file that is
truncated or not an adapter, before anything changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from qft.files.atomic import atomic_dir
from qft.files.checkpoint import CheckpointError, quantization_config
from qft.nn import qft_layers

ADAPTER_VERSION = 1
WEIGHTS, HEADER = "adapter.safetensors", "adapter.json"


def _adapters(model: nn.Module, every_name: bool) -> dict[str, nn.Parameter]:
    found = {}
    for name, layer in qft_layers(model, every_name=every_name).items():
        for part, param in layer.adapters().items():
            key = "weight_scale" if part == "scale" else part  # a trainable scale's state-dict name
            found[f"{name}.{key}" if name else key] = param
    return found


def adapter_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters of every qft layer, by state-dict name (a trainable scale is ``<layer>.weight_scale``;
    a layer shared by two names appears once, under the first)."""
    return _adapters(model, every_name=False)


def base_fingerprint(model: nn.Module) -> str:
    """SHA-256 of everything in the state dict that is not an adapter (names, dtypes, shapes, bytes)."""
    skip = set(_adapters(model, every_name=True))
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name in skip:
            continue
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # hashed in place, no bytes copy
    return digest.hexdigest()


def _method(model: nn.Module) -> str | None:
    """The method the model was prepared with, as its report or loaded checkpoint records it."""
    if getattr(model, "qft_report", None) is None and not hasattr(model, "config"):
        return None  # a bare stack of layers keeps no record
    return quantization_config(model).get("report", {}).get("method")


def save_adapter(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write the model's adapters and what identifies their base; returns the folder."""
    tensors = adapter_tensors(model)
    if not tensors:
        raise ValueError("the model has no qft adapters to save; call qft.quantize_and_prepare(model) first")
    header = {
        "adapter_version": ADAPTER_VERSION,
        "method": _method(model),
        "base_sha256": base_fingerprint(model),
        "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                    for k, v in tensors.items()},
    }
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        (tmp / HEADER).write_text(json.dumps(header, indent=1))
    return Path(folder)


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, tensors) of the qft adapter in ``folder``, checked to be one this qft reads (a
    CheckpointError otherwise); nothing is loaded into a model."""
    try:
        header = json.loads((folder / HEADER).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{folder} is not a qft adapter (no readable {HEADER}: {err})") from err
    if header.get("adapter_version") != ADAPTER_VERSION:
        raise CheckpointError(f"{folder}: adapter version {header.get('adapter_version')!r}, this qft reads "
                              f"version {ADAPTER_VERSION}")
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{folder / WEIGHTS} cannot be read (truncated or not safetensors: {err}); "
                              "save the adapter again") from err
    return header, tensors


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Swap the adapter in ``folder`` into ``model`` in place (same parameters, new values)."""
    folder = Path(folder)
    header, tensors = read_adapter(folder)
    method, ours = header.get("method"), _method(model)
    if method and ours and method != ours:
        raise ValueError(f"{folder} is a {method!r} adapter; this model was prepared with {ours!r}")
    if header.get("base_sha256") != base_fingerprint(model):
        raise ValueError(f"{folder} was made for another base model (its frozen weights differ from this "
                         "model's); load the base it was trained on")
    params = adapter_tensors(model)
    if tensors.keys() != params.keys():
        extra, missing = sorted(tensors.keys() - params.keys()), sorted(params.keys() - tensors.keys())
        raise ValueError(f"{folder} does not fit this model: unexpected {extra[:3]}, missing {missing[:3]}")
    for name, value in tensors.items():
        if value.shape != params[name].shape:
            raise ValueError(f"{folder}: {name} has shape {tuple(value.shape)}, the model's is "
                             f"{tuple(params[name].shape)}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    return model
