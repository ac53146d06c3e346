"""Streaming quantization: a model read from its safetensors files one tensor at a time.

``quantize_and_prepare("path/to/model", ...)`` builds the model's skeleton with its parameters on
the meta device (no memory), loads what stays in full precision (embeddings, norms, the output
head, biases) and reads each target weight from disk only when the bit allocation or the method
needs it, dropping it afterwards. Peak memory is then about the packed model plus one matrix's
work, where loading the model first holds all of it in full precision.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qft.files.checkpoint import CheckpointError, folder_layout, tensor_layout
from qft.nn.qlinear import is_conv1d
from qft.nn.targets import find_target_linears


class FileTensors(Mapping):
    """Every tensor of a model folder's safetensors files (its index honoured), or of the files listed, by
    name, read from disk on each access."""

    def __init__(self, source: str | os.PathLike | list[str | os.PathLike]) -> None:
        layouts = (folder_layout(source) if isinstance(source, (str, os.PathLike))
                   else {Path(f): tensor_layout(f) for f in source})
        self.file_of: dict[str, Path] = {k: f for f, layout in layouts.items() for k in layout}

    def __getitem__(self, key: str) -> torch.Tensor:
        with safe_open(self.file_of[key], "pt") as handle:
            return handle.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(self.file_of[key], "pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self.file_of)

    def __len__(self) -> int:
        return len(self.file_of)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to do
        return None


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS. glibc raises its mmap threshold after large blocks are
    freed, so one matrix's temporaries land in the heap and stay there when freed: without this a
    1.1 B-parameter model streams at 3.5 GB peak instead of 2.0 (benchmarks/streaming.py)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class TargetWeights(Mapping):
    """The (out_features, in_features) float32 weight of each target layer, by module name, read on access."""

    def __init__(self, tensors: FileTensors, targets: dict[str, nn.Module]) -> None:
        self.tensors = tensors
        self.transposed = {name: is_conv1d(m) for name, m in targets.items()}
        missing = [n for n in targets if f"{n}.weight" not in tensors]
        if missing:
            raise CheckpointError(f"the checkpoint has no tensor {missing[0]}.weight (and {len(missing) - 1} more "
                                  "target weights); is it this model's checkpoint?")

    def __getitem__(self, name: str) -> torch.Tensor:
        _return_freed_memory()  # the previous matrix's work
        w = self.tensors[f"{name}.weight"].float()
        if not torch.isfinite(w).all():
            raise ValueError(f"{name}.weight holds NaN or Inf values; fix the model before quantizing")
        return w.t() if self.transposed[name] else w

    def shape(self, name: str) -> tuple[int, int]:
        shape = self.tensors.shape(f"{name}.weight")
        return shape[::-1] if self.transposed[name] else shape

    def __iter__(self) -> Iterator[str]:
        return iter(self.transposed)

    def __len__(self) -> int:
        return len(self.transposed)


def open_model(directory: str | os.PathLike, target_modules=None, skip_modules=None,
               dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict[str, nn.Module], FileTensors]:
    """(model, target layers, the checkpoint's tensors): the model with every tensor loaded (in
    ``dtype``) except the target layers' weights, which stay on the meta device until quantized."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json: not a model folder")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=dtype)
    targets = find_target_linears(model, target_modules, skip_modules)
    tensors = FileTensors(directory)
    TargetWeights(tensors, targets)  # every target weight is there
    held = {f"{n}.weight" for n in targets}
    params = dict(model.named_parameters(remove_duplicate=False))
    rest = {k: tensors[k].to(params[k].dtype if k in params else dtype) for k in tensors if k not in held}
    model.load_state_dict(rest, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta and n not in held]
    if still_meta:
        raise CheckpointError(f"the checkpoint has no tensor {still_meta[0]} (and {len(still_meta) - 1} more); "
                              "is it this model's checkpoint?")
    return model.eval(), targets, tensors
