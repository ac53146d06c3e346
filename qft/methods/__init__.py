"""Methods: how a weight becomes a QLinear (quantized part + adapters), one module per method.

A method registers a ``build`` function under its name with :func:`register_method`;
``quantize_and_prepare(method=...)`` looks it up with :func:`get_method` and
calls it once per target matrix, after the format of that matrix is chosen:

    build(w, bias, fmt, options) -> Built(layer, error)

``w`` is the float32 (out, in) weight on its own device, ``fmt`` the chosen
format, ``options`` what the caller asked for (:class:`MethodOptions`).
``table_rank(rank)`` says which rank the error table (bit allocation) should
assume the adapters absorb (0 for methods without a low-rank part).

A method that does not quantize matrix by matrix under a bit budget (HALO: low-precision
matmuls) registers a whole-model ``prepare(model, targets, *, rank, alpha, seed, progress,
**options) -> {name: layer}`` instead (:func:`register_prepare_method`), with the names of the
options it takes (``quantize_and_prepare(..., level=2)``); it builds every layer without touching
the model, and ``quantize_and_prepare`` swaps them in once all are built. What
trains is decided by the layer the method builds (its adapters), never by
parameter names. A method rounds through :func:`quantize`, so that
``rounding="gptq"`` (``options.hessian`` set) reaches every method alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qft.methods.gptq import gptq as gptq_rounding  # not ``gptq``: that name is the submodule
from qft.quant.formats import Format
from qft.quant.formats.base import check_choice
from qft.nn import QLinear
from qft.quant.tensor import QuantizedTensor

ROUNDINGS = ("rtn", "gptq")


@dataclass
class MethodOptions:
    rank: int
    alpha: float | None
    fisher: torch.Tensor | None  # (out, in) empirical Fisher of this matrix, or None
    seed: int
    generator: torch.Generator  # one stream shared by every layer of one preparation
    iters: int
    dtype: torch.dtype  # the logical dtype of the quantized weight (the model's)
    hessian: torch.Tensor | None = None  # (in, in) calibration Hessian when rounding="gptq"


@dataclass
class Built:
    layer: QLinear
    error: float  # what the method minimised at initialisation: Σ F ⊙ (W − W_layer)² (F = 1 without Fisher),
    # or LQ-LoRA's output error tr(R H Rᵀ) under GPTQ rounding; the report's errors are plain Frobenius


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[torch.Tensor, torch.Tensor | None, Format, MethodOptions], Built] | None
    needs_rank: bool  # rank >= 1 required
    table_rank: Callable[[int], int]
    description: str
    grid: Callable[[], list[Format]] | None = None  # the candidates a budget allocates over (None: NF grid)
    default_rank: int = 64  # the rank when the caller gives none
    width_format: Callable[[int], str] | None = None  # an int ``bits`` names a format, not a budget
    rounding: str = "rtn"  # the rounding when the caller gives none: "rtn" or "gptq"
    prepare: Callable[..., dict[str, torch.nn.Module]] | None = None  # replaces the per-matrix pipeline
    options: tuple[str, ...] = ()  # the method's own keyword options of quantize_and_prepare


METHODS: dict[str, Method] = {}


def register_method(name: str, *, needs_rank: bool, table_rank: Callable[[int], int] = lambda r: r,
                    description: str = "", grid: Callable[[], list[Format]] | None = None,
                    default_rank: int = 64, width_format: Callable[[int], str] | None = None,
                    rounding: str = "rtn"):
    """Decorator: register ``build`` as method ``name``; ``grid`` gives the formats a bit budget
    chooses from (default: LQ-LoRA's NF grid); ``default_rank`` the rank when none is given;
    ``width_format`` turns an integer ``bits`` into a format name (else it is a budget);
    ``rounding`` is the method's default rounding."""
    check_choice("rounding", rounding, ROUNDINGS)

    def wrap(build):
        METHODS[name] = Method(name, build, needs_rank, table_rank, description or (build.__doc__ or "").strip(),
                               grid, default_rank, width_format, rounding)
        return build
    return wrap


def register_prepare_method(name: str, *, options: tuple[str, ...], default_rank: int = 0, description: str = ""):
    """Decorator: register ``prepare(model, targets, *, rank, alpha, seed, progress, **options)`` as method
    ``name``, for a method that replaces the per-matrix pipeline (no bit budget, no error table)."""

    def wrap(prepare):
        METHODS[name] = Method(name, None, False, lambda r: 0, description or (prepare.__doc__ or "").strip(),
                               default_rank=default_rank, prepare=prepare, options=options)
        return prepare
    return wrap


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def quantize(w: torch.Tensor, fmt: Format, options: MethodOptions) -> QuantizedTensor:
    """A method's Q: round-to-nearest, or GPTQ under the matrix's calibration Hessian when there is one."""
    if options.hessian is None:
        return QuantizedTensor.quantize(w, fmt, options.dtype)
    return gptq_rounding(w, fmt, options.hessian, dtype=options.dtype)


def weighted_error(w: torch.Tensor, approx: torch.Tensor, fisher: torch.Tensor | None) -> float:
    """sum(F ⊙ (W − A)²) in float32 (F: the Fisher diagonal; None: 1, the squared Frobenius error)."""
    diff = (w.float() - approx.float()).square_()  # in place: one temporary the size of w, not two
    return float((diff if fisher is None else diff.mul_(fisher.float())).sum())


# the built-in methods register themselves on import
from qft.methods import halo, int21, lqlora, peqa, qalora, qlora  # noqa: E402,F401
from qft.methods.lqlora import Decomposition  # noqa: E402

__all__ = ["METHODS", "ROUNDINGS", "Built", "Decomposition", "Method", "MethodOptions", "get_method", "quantize",
           "register_method", "register_prepare_method", "weighted_error"]
