"""LQ-LoRA: W ≈ Q + L1·L2, a quantized matrix plus a rank-r high-precision part.

Start from a rank-r randomized SVD of W, then alternate
    Q = quantize(W − L1·L2)   and   L1·L2 = SVD_r(W − Q),
keep the best iterate, stop when the error stops improving. ``iters=1`` is
LoftQ's one-step initialisation (PEFT's ``loftq_iter=1``).

Data-aware variant: given an empirical diagonal Fisher F (same shape as W),
the error is Σ F ⊙ (W − Q − L1L2)² and the SVD step is weighted by a rank-1
approximation of F: F_ij ≈ r_i² c_j², so SVD(diag(r)·M·diag(c)) gives the
weighted-optimal factors exactly for rank-1 weights. Rounding to the nearest
code is already element-wise optimal for any positive weight, so Q's step is
unchanged.

With a calibration Hessian H (``rounding="gptq"``), the Q-step is GPTQ(W − L1·L2) and
the error that picks the best iterate is the output error tr(R H Rᵀ), R = W − Q − L1L2.

Deterministic for a given seed: the randomized SVD draws from its own generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from qft.methods import Built, MethodOptions, register_method, weighted_error
from qft.methods.gptq import gptq, output_error
from qft.quant.formats import Format, check_weight, get_format
from qft.nn import QLinear
from qft.quant.tensor import QuantizedTensor


@dataclass
class Decomposition:
    qweight: QuantizedTensor
    L1: torch.Tensor  # (out, rank): QLinear's lora_B
    L2: torch.Tensor  # (rank, in): QLinear's lora_A
    error: float  # Σ F ⊙ (W − Q − L1L2)² (F = 1 without Fisher)
    history: list[float] = field(default_factory=list)  # error after each iteration


def randomized_svd(
    m: torch.Tensor,
    rank: int,
    generator: torch.Generator,
    oversample: int = 16,
    power_iters: int = 4,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of ``m`` (Halko et al.): U (rows, r), S (r,), V (cols, k >= r).

    V keeps all ``rank + oversample`` sketch directions so that the next call on
    a nearby matrix can start from them (``start``): LQ-LoRA's residuals change
    little between iterations, so the subspace iteration keeps converging
    across them instead of restarting from noise.
    """
    rows, cols = m.shape
    k = min(rank + oversample, rows, cols)
    if start is None:
        start = torch.randn(cols, k, generator=generator, dtype=m.dtype).to(m.device)
    y = m @ start
    for _ in range(power_iters):
        y = m @ torch.linalg.qr(m.t() @ torch.linalg.qr(y).Q).Q
    q = torch.linalg.qr(y).Q
    u, s, vh = torch.linalg.svd(q.t() @ m, full_matrices=False)
    return (q @ u)[:, :rank], s[:rank], vh.t()


def rank1_weights(fisher: torch.Tensor, floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column weights r, c with r_i² c_j² ≈ F_ij (means of F over columns and rows)."""
    f = fisher.float().clamp(min=0)
    mean = f.mean().clamp(min=1e-30)
    rows = f.mean(dim=1).clamp(min=floor * mean)
    cols = (f.mean(dim=0) / mean).clamp(min=floor)
    return rows.sqrt(), cols.sqrt()


def low_rank(
    m: torch.Tensor,
    rank: int,
    generator: torch.Generator,
    weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L1 (rows, r), L2 (r, cols) minimising ||diag(r)(m − L1L2)diag(c)||_F (plain SVD without weights),
    and the sketch basis to ``start`` the next call from."""
    r, c = weights if weights is not None else (None, None)
    target = m if weights is None else r[:, None] * m * c[None, :]
    u, s, v = randomized_svd(target, rank, generator, start=start)
    root = s.sqrt()
    l1, l2 = u * root, (v[:, :rank] * root).t()
    if weights is not None:
        l1, l2 = l1 / r[:, None], l2 / c[None, :]
        # Undoing the Fisher weights leaves the factors far apart in scale (|L1| ~ 1/sqrt(F)); equal
        # norms per component keep the product and let AdamW's per-element steps treat both alike.
        balance = (l2.norm(dim=1) / l1.norm(dim=0).clamp_min(1e-30)).sqrt()
        l1, l2 = l1 * balance[None, :], l2 / balance[:, None]
    return l1, l2, v


def lqlora(
    w: torch.Tensor,
    format: str | Format,
    rank: int,
    *,
    fisher: torch.Tensor | None = None,
    iters: int = 10,
    tol: float = 1e-3,
    init: str = "svd",
    seed: int = 0,
    hessian: torch.Tensor | None = None,
) -> Decomposition:
    """Decompose ``w`` into a quantized part and a rank-``rank`` part (see module docstring).

    iters: at most this many Q/SVD alternations; stops early once an iteration
    improves the error by less than ``tol`` (relative).
    init: "svd" starts from L1L2 = SVD_r(W) (LQ-LoRA); "zero" from L1L2 = 0, so
    that ``iters=1`` is PEFT's LoftQ with ``loftq_iter=1``: Q = quantize(W),
    L1L2 = SVD_r(W − Q).
    hessian: (in, in) calibration Hessian: GPTQ rounding, output error (module docstring).
    """
    w = check_weight(w)
    fmt = get_format(format)
    if fisher is not None and fisher.shape != w.shape:
        raise ValueError(f"fisher must have the weight's shape {tuple(w.shape)}, got {tuple(fisher.shape)}")
    if not 0 < rank <= min(w.shape):
        raise ValueError(f"rank must be in [1, {min(w.shape)}] for a {tuple(w.shape)} weight, got {rank}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if init not in ("svd", "zero"):
        raise ValueError(f"init must be 'svd' or 'zero', got {init!r}")
    generator = torch.Generator().manual_seed(seed)
    weights = None if fisher is None else rank1_weights(fisher)

    basis = None
    if init == "svd":
        l1, l2, _ = low_rank(w, rank, generator, weights)
    else:
        l1, l2 = w.new_zeros(w.shape[0], rank), w.new_zeros(rank, w.shape[1])
    best, history = None, []  # best: (error, target of Q, L1, L2, Q when GPTQ made it)
    for _ in range(iters):
        target = w - l1 @ l2
        quantized = None if hessian is None else gptq(target, fmt, hessian)
        residual = w - (fmt.fake_quantize(target) if quantized is None else quantized.dequantize())
        l1, l2, basis = low_rank(residual, rank, generator, weights, start=basis)
        if hessian is None:
            error = weighted_error(residual, l1 @ l2, fisher)
        else:
            error = output_error(residual, l1 @ l2, hessian)
        history.append(error)
        if best is None or error < best[0]:
            previous = None if best is None else best[0]
            best = (error, target, l1, l2, quantized)
            if previous is None or error < previous * (1 - tol):
                continue
        break  # no longer improving by tol
    error, target, l1, l2, quantized = best
    if quantized is None:
        quantized = QuantizedTensor.quantize(target, fmt)
    return Decomposition(quantized, l1, l2, error, history)


def _layer(d: Decomposition, bias, options: MethodOptions) -> Built:
    # L1 is QLinear's lora_B and L2 its lora_A. With scaling s = alpha / rank (default 1) both are divided
    # by √s, as PEFT's PiSSA initialisation does: Q + s·B·A is still Q + L1·L2 as decomposed.
    alpha = options.rank if options.alpha is None else options.alpha
    root = math.sqrt(alpha / options.rank)
    qweight = d.qweight.to(options.dtype)
    layer = QLinear(qweight, bias, rank=options.rank, alpha=alpha, lora_a=d.L2 / root, lora_b=d.L1 / root)
    return Built(layer, d.error)


@register_method("lqlora", needs_rank=True, description="LQ-LoRA: iterate Q = quantize(W − L1L2), L1L2 = SVD_r(W − Q)")
def build_lqlora(w: torch.Tensor, bias, fmt: Format, options: MethodOptions) -> Built:
    d = lqlora(w, fmt, options.rank, fisher=options.fisher, iters=options.iters, init="svd", seed=options.seed,
               hessian=options.hessian)
    return _layer(d, bias, options)


@register_method("loftq", needs_rank=True, description="LoftQ (PEFT's loftq_iter=1): Q = quantize(W), L1L2 = SVD_r(W − Q)")
def build_loftq(w: torch.Tensor, bias, fmt: Format, options: MethodOptions) -> Built:
    d = lqlora(w, fmt, options.rank, fisher=options.fisher, iters=1, init="zero", seed=options.seed,
               hessian=options.hessian)
    return _layer(d, bias, options)
