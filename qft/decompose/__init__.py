"""Methods: how a weight becomes a QLinear (quantized part + adapters), one module per method.

A method registers a ``build`` function under its name with :func:`register_method`;
``quantize_and_prepare(method=...)`` looks it up with :func:`get_method` and
calls it once per target matrix, after the format of that matrix is chosen:

    build(w, bias, fmt, options) -> Built(layer, error)

``w`` is the float32 (out, in) weight on its own device, ``fmt`` the chosen
format, ``options`` what the caller asked for (:class:`MethodOptions`).
``table_rank(rank)`` says which rank the error table (bit allocation) should
assume the adapters absorb (0 for methods without a low-rank part). What
trains is decided by the layer the method builds (its adapters), never by
parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qft.formats import Format
from qft.nn import QLinear


@dataclass
class MethodOptions:
    rank: int
    alpha: float | None
    fisher: torch.Tensor | None  # (out, in) empirical Fisher of this matrix, or None
    seed: int
    generator: torch.Generator  # one stream shared by every layer of one preparation
    iters: int
    dtype: torch.dtype  # the logical dtype of the quantized weight (the model's)


@dataclass
class Built:
    layer: QLinear
    error: float  # Σ F ⊙ (W − W_layer)² at initialisation (F = 1 without Fisher)


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[torch.Tensor, torch.Tensor | None, Format, MethodOptions], Built]
    needs_rank: bool  # rank >= 1 required
    table_rank: Callable[[int], int]
    description: str
    grid: Callable[[], list[Format]] | None = None  # the candidates a budget allocates over (None: NF grid)
    default_rank: int = 64  # the rank when the caller gives none
    width_format: Callable[[int], str] | None = None  # an int ``bits`` names a format, not a budget


METHODS: dict[str, Method] = {}


def register_method(name: str, *, needs_rank: bool, table_rank: Callable[[int], int] = lambda r: r,
                    description: str = "", grid: Callable[[], list[Format]] | None = None,
                    default_rank: int = 64, width_format: Callable[[int], str] | None = None):
    """Decorator: register ``build`` as method ``name``; ``grid`` gives the formats a bit budget
    chooses from (default: LQ-LoRA's NF grid); ``default_rank`` the rank when none is given;
    ``width_format`` turns an integer ``bits`` into a format name (else it is a budget)."""
    def wrap(build):
        METHODS[name] = Method(name, build, needs_rank, table_rank, description or (build.__doc__ or "").strip(),
                               grid, default_rank, width_format)
        return build
    return wrap


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def weighted_error(w: torch.Tensor, approx: torch.Tensor, fisher: torch.Tensor | None) -> float:
    diff = (w.float() - approx.float()) ** 2
    return float((diff if fisher is None else fisher.float() * diff).sum())


# the built-in methods register themselves on import
from qft.decompose import lqlora, peqa, qlora  # noqa: E402,F401
from qft.decompose.lqlora import Decomposition  # noqa: E402

__all__ = ["METHODS", "Built", "Decomposition", "Method", "MethodOptions", "get_method", "register_method"]
