"""Bit allocation: one NF configuration per matrix, average bits under a budget.

1. The grid: NF-k with k in {2,3,4,8}, block B0 in {16,32,64}, and either fp32
   scales or scales double-quantized to b0 in {2,3,4,8} bits in blocks of B1 in
   {16,64,256} with an fp16 or fp32 second level (300 configurations).
2. The error table (matrix x configuration). A full LQ-LoRA decomposition per
   cell is too slow, so each cell is estimated by quantizing one residual per
   matrix: R = W - SVD_r(W) (Fisher-weighted when given), error = Σ F (R - Q(R))².
   That costs one quantization per cell and no SVD per configuration. The NF
   cells of a matrix share the blocks' absmax (per block size) and stored scales
   (per scale configuration) and pack no codes; the values they compare against
   equal the stored formats' dequantized values exactly. The
   quantization error is further estimated on every ``row_stride``-th row
   (default 4) and scaled up: errors are sums over many alike rows.
   benchmarks/lqlora.py measures how close its choices come to the full table's.
   Configurations dominated on a sample of matrices (another costs no more and
   is never worse) are dropped before the full table is filled.
3. The multiple-choice knapsack (qft.solvers) under budget = bits x parameters,
   costs being each configuration's exact storage for each matrix's shape.

The table is cached on disk, keyed by the weights, the Fisher, rank, seed and grid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from qft.methods.lqlora import low_rank, rank1_weights
from qft.quant.formats import Format, NormalFloat, check_weight, get_format
from qft.quant.formats.base import to_blocks
from qft.solvers.mckp import Solution, check_budget, solve

logger = logging.getLogger(__name__)

TABLE_VERSION = "2"  # bump when the estimate changes


def nf_grid() -> list[NormalFloat]:
    """LQ-LoRA's NF configurations (plus the plain fp32-scale ones)."""
    grid = []
    for k in (2, 3, 4, 8):
        for b0_block in (16, 32, 64):
            grid.append(NormalFloat(k, b0_block))
            for scale_bits in (2, 3, 4, 8):
                for scale_block in (16, 64, 256):
                    for second in ("fp16", "fp32"):
                        grid.append(NormalFloat(k, b0_block, scale_bits, scale_block, second))
    return grid


@dataclass
class ErrorTable:
    names: list[str]
    formats: list[Format]
    errors: np.ndarray  # (matrices, formats)
    costs: np.ndarray  # (matrices, formats): exact storage bits
    numel: np.ndarray  # (matrices,)


def _residual(w, rank, fisher, seed) -> torch.Tensor:
    if rank == 0:
        return w
    weights = None if fisher is None else rank1_weights(fisher)
    l1, l2, _ = low_rank(w, rank, torch.Generator().manual_seed(seed), weights)
    return w - l1 @ l2


def _errors(residual: torch.Tensor, importance: torch.Tensor | None, formats: list[Format]) -> np.ndarray:
    """Σ importance · (residual − Q(residual))² in each format.

    NF formats share work: the blocks and their absmax per block size, and the stored scale
    per scale configuration (the same for every bit width).
    """
    blocked, scales, out = {}, {}, []
    for fmt in formats:
        if isinstance(fmt, NormalFloat):
            if fmt.block not in blocked:
                blocks = to_blocks(residual, fmt.block)
                weight = None if importance is None else to_blocks(importance, fmt.block)
                blocked[fmt.block] = blocks, blocks.abs().amax(dim=-1), weight
            blocks, absmax, weight = blocked[fmt.block]
            key = (fmt.block, fmt.scale_bits, fmt.scale_block, fmt.second_level)
            if key not in scales:
                scales[key] = fmt.stored_scale(absmax)
            diff = blocks - fmt.fake_quantize_blocks(blocks, scales[key])
        else:
            diff, weight = residual - fmt.fake_quantize(residual), importance
        diff = diff.mul_(diff) if weight is None else (weight * diff).mul_(diff)
        out.append(float(diff.sum()))
    return np.array(out)


def _cache_key(weights, fisher, formats, rank, seed) -> str:
    h = hashlib.sha256(f"{TABLE_VERSION}|{rank}|{seed}|{[f.name for f in formats]}".encode())
    for name, w in weights.items():
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(w.detach().float().cpu().contiguous().numpy().tobytes())
        if fisher is not None:
            h.update(fisher[name].float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _shape(weights: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """A weight's shape; a mapping that reads weights from disk (qft.prepare.streaming) says it without reading."""
    shape = getattr(weights, "shape", None)
    return tuple(shape(name)) if callable(shape) else tuple(weights[name].shape)


class _Subset(Mapping):
    """Some entries of a mapping, each read from it on access (never all held at once)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], names: list[str]) -> None:
        self.weights, self.names = weights, list(dict.fromkeys(names))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.weights[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return _shape(self.weights, name)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def default_cache_dir() -> Path:
    base = os.environ.get("QFT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "qft")
    return Path(base).expanduser()


def error_table(
    weights: dict[str, torch.Tensor],
    formats: list[str | Format],
    rank: int,
    *,
    fisher: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    row_stride: int = 4,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> ErrorTable:
    """Estimated decomposition error of every matrix in every format (see module docstring)."""
    formats = [get_format(f) for f in formats]
    names = list(weights)
    shapes = {n: _shape(weights, n) for n in names}
    numel = np.array([math.prod(shapes[n]) for n in names], dtype=np.float64)
    costs = np.array([[f.storage_bits(*shapes[n]) for f in formats] for n in names], dtype=np.float64)

    path = None
    if cache_dir is not False:
        key = _cache_key(weights, fisher, formats, f"{rank}|{row_stride}", seed)
        path = Path(cache_dir or default_cache_dir()) / f"errors-{key}.safetensors"
        if path.exists():
            stored = load_file(path)["errors"].numpy()
            if stored.shape == costs.shape:
                logger.info("error table from cache %s", path)
                return ErrorTable(names, formats, stored, costs, numel)
            logger.warning("ignoring cached table %s of the wrong shape %s", path, stored.shape)

    errors = np.full((len(names), len(formats)), np.inf)  # inf: the format cannot hold the matrix
    for i, name in enumerate(tqdm(names, disable=not progress, desc="error table", unit="matrix")):
        w = check_weight(weights[name])
        f = None if fisher is None else fisher[name].float()
        residual = _residual(w, rank, f, seed)[::row_stride].contiguous()
        importance = None if f is None else f[::row_stride].contiguous()
        fit = [j for j, fmt in enumerate(formats) if fmt.fits(*w.shape)]
        errors[i, fit] = w.shape[0] / residual.shape[0] * _errors(residual, importance, [formats[j] for j in fit])

    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({"errors": torch.from_numpy(errors)}, str(tmp), metadata={"names": json.dumps(names)})
        os.replace(tmp, path)
    return ErrorTable(names, formats, errors, costs, numel)


def undominated(table: ErrorTable) -> list[int]:
    """Columns not dominated: no other format costs no more on every matrix and errs no more on every one."""
    keep = []
    for c in range(len(table.formats)):
        cheaper = np.all(table.costs <= table.costs[:, [c]], axis=0)
        better = np.all(table.errors <= table.errors[:, [c]], axis=0)
        strictly = np.any(table.costs < table.costs[:, [c]], axis=0) | np.any(table.errors < table.errors[:, [c]], axis=0)
        dominated = cheaper & better & strictly
        # of identical columns keep the first
        same = cheaper & better & ~strictly
        same[c:] = False
        if not dominated.any() and not same.any():
            keep.append(c)
    return keep


def pruned_grid(
    weights: dict[str, torch.Tensor],
    rank: int,
    *,
    fisher: dict[str, torch.Tensor] | None = None,
    formats: list[str | Format] | None = None,
    sample: int = 14,
    seed: int = 0,
    row_stride: int = 4,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> list[Format]:
    """The grid without the configurations dominated on an evenly spaced sample of matrices."""
    formats = [get_format(f) for f in (formats or nf_grid())]
    names = list(weights)
    picks = [names[i] for i in np.linspace(0, len(names) - 1, min(sample, len(names))).round().astype(int)]
    sub = _Subset(weights, picks)
    sub_fisher = None if fisher is None else {n: fisher[n] for n in sub}
    table = error_table(sub, formats, rank, fisher=sub_fisher, seed=seed, row_stride=row_stride,
                        cache_dir=cache_dir, progress=progress)
    kept = [formats[c] for c in undominated(table)]
    logger.info("%d of %d configurations survive dominance on %d matrices", len(kept), len(formats), len(sub))
    return kept


def allocate(table: ErrorTable, bits: float, *, solver: str = "auto", time_limit: float = 60.0) -> tuple[list[Format], Solution]:
    """One format per matrix of ``table`` with average storage <= ``bits`` per parameter."""
    total = float(table.numel.sum())
    fits = np.isfinite(table.errors)
    unfit = [n for n, row in zip(table.names, fits) if not row.any()]
    if unfit:
        raise ValueError(f"no candidate format can hold {unfit[0]} (and {len(unfit) - 1} more matrices): ggml's types "
                         "need rows of whole blocks (32, or 256 for the K types); add a format that fits, e.g. 'q8_0'")
    # a format that cannot hold a matrix costs as much as the dearest that can and errs more: never chosen
    dearest = np.where(fits, table.costs, -np.inf).max(axis=1, keepdims=True)
    worst = np.where(fits, table.errors, -np.inf).max(axis=1, keepdims=True)
    costs = np.where(fits, table.costs, dearest)
    errors = np.where(fits, table.errors, 2 * worst + 1)
    check_budget(costs, bits * total, per_unit=total, unit=" bits/param")
    solution = solve(errors, costs, bits * total, solver=solver, time_limit=time_limit)
    for i, c in enumerate(solution.choice):  # within the solver's gap a stand-in could remain: the fitting
        if not fits[i, c]:                   # option of no greater cost and least error replaces it
            solution.choice[i] = int(np.argmin(np.where(fits[i] & (table.costs[i] <= costs[i, c]), table.errors[i],
                                                        np.inf)))
    return [table.formats[c] for c in solution.choice], solution
