"""Modules that hold quantized weights, and the one place that decides what trains."""

from collections.abc import Mapping

from torch import nn

from qft.nn.dense_cache import dense_weights
from qft.nn.halo import HaloLinear, HaloSettings
from qft.nn.qlinear import QLinear, dense_weight

LAYERS = {"qlinear": QLinear, "halo": HaloLinear}  # a checkpoint's spec names its layer by these keys
QFT_LAYERS = tuple(LAYERS.values())


def qft_layers(model: nn.Module, kinds: tuple[type, ...] = QFT_LAYERS, *, every_name: bool = False
               ) -> dict[str, nn.Module]:
    """The model's qft layers by module name (``kinds``: only these classes). A layer shared by two
    places (a tied head) is listed once, under its first name, unless ``every_name``."""
    return {n: m for n, m in model.named_modules(remove_duplicate=not every_name) if isinstance(m, kinds)}


def tied_names(objects: Mapping[str, object]) -> dict[str, str]:
    """name -> the first name of the same object (by identity), for every name after the first that holds
    it: which places are tied. Give layers to tie by module, or their weights to tie by the weight."""
    first: dict[int, str] = {}
    return {name: first[id(o)] for name, o in objects.items() if first.setdefault(id(o), name) != name}


def mark_trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """What trains: each qft layer's ``adapters()`` (low-rank factors, trainable scales, a HALO
    layer's own weight); everything else is frozen."""
    trainable = {}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in qft_layers(model).items():
        for n, p in module.adapters().items():
            p.requires_grad_(True)
            trainable[f"{name}.{n}" if name else n] = p
    return trainable


__all__ = ["LAYERS", "QFT_LAYERS", "HaloLinear", "HaloSettings", "QLinear", "dense_weight", "dense_weights",
           "mark_trainable", "qft_layers", "tied_names"]
