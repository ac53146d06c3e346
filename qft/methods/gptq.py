"""GPTQ (Frantar et al., 2022): Hessian-aware rounding for every qft format.

Rounding W column by column, GPTQ pushes each column's rounding error onto the columns
not yet rounded, weighted by the inverse of H = XᵀX (X: the layer's calibration inputs),
so that ||(W − Q)X||² — the error of the layer's *output* — is small rather than
||W − Q||². Lazy block updates (Cholesky of H⁻¹, 128 columns at a time) and optional
act-order (columns in order of decreasing H diagonal) as in the paper.

One routine serves every format because every qft format dequantizes as
(codebook[code] − zero)·scale per block (``qft.quant.formats.base``): the scales and zero-points
are fixed first, as the format's round-to-nearest chooses them from W ("static groups"),
and GPTQ then picks each code on that grid. So act-order needs no regrouping, NF-k with
double-quantized scales works unchanged, and with H = I GPTQ gives round-to-nearest's codes.

:class:`LayerwiseHessians` gathers H decoder layer by decoder layer: each layer's inputs come
from the layers before it *as already quantized* by the caller (changed in place, or given as
stand-ins that are swapped in only while the calibration runs through them, so that the model is
left untouched if a later matrix fails); memory is one layer's activations plus its Hessians.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from qft.files.data import calibration_blocks
from qft.quant.formats import Format, check_weight, get_format
from qft.quant.packing import pack
from qft.nn.distributed import decoder_layers
from qft.nn.targets import set_module
from qft.quant.tensor import QuantizedTensor

logger = logging.getLogger(__name__)


@dataclass
class Grid:
    """Where each weight may land: (codebook[code] − zero)·scale, one scale/zero per block of columns."""

    codebook: torch.Tensor  # (n,) float32, ascending, finite
    code_of: torch.Tensor  # (n,) the format's code of each codebook entry
    scale: torch.Tensor  # (rows or 1, n_blocks) float32
    zero: torch.Tensor | None  # like scale, or None (symmetric)
    block: int

    def per_column(self, blocks: torch.Tensor, cols: int) -> torch.Tensor:
        """A per-block tensor (rows or 1, n_blocks) spread to one column each: (rows or 1, cols)."""
        return blocks.repeat_interleave(self.block, dim=1)[:, :cols]


def format_grid(w: torch.Tensor, fmt: Format) -> tuple[Grid, dict[str, torch.Tensor]]:
    """The grid round-to-nearest of ``fmt`` sets up for ``w``, and the stored scale tensors behind it."""
    rows, cols = w.shape
    _, tensors = fmt.quantize(w)
    scale, zero = fmt.decode_scales(tensors, rows, cols)
    book = fmt.codebook(w.device)
    finite = torch.isfinite(book).nonzero().flatten()  # FP8 has NaN (and E5M2 inf) patterns: never chosen
    values, order = book[finite].sort(stable=True)
    return Grid(values, finite[order].to(torch.uint8), scale.to(w.device),
                None if zero is None else zero.to(w.device), fmt.block_size(rows, cols)), tensors


def output_error(w: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W − A) H (W − A)ᵀ) = ||(W − A)X||² for H = XᵀX: what GPTQ minimises."""
    diff = (w.float() - approx.float()).to(hessian.dtype)
    return float(((diff @ hessian) * diff).sum())


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹; a column never seen (zero diagonal) gets 1."""
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(torch.diag(h).mean()))
    for _ in range(5):  # a nearly singular H: more damping until it factors
        factor, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        h.diagonal().add_(damp * float(torch.diag(h).mean()))
    else:
        raise ValueError("the calibration Hessian is not positive definite even with extra damping; "
                         "give more calibration text or a larger damp")
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True).float()


def gptq_codes(w: torch.Tensor, grid: Grid, hessian: torch.Tensor, *, damp: float = 0.01,
               block_size: int = 128, act_order: bool = False) -> torch.Tensor:
    """Codes (uint8, w's shape, indices into ``grid.codebook``) chosen by GPTQ for ``w`` under ``hessian``."""
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"the Hessian must be ({cols}, {cols}) for a {tuple(w.shape)} weight, got {tuple(hessian.shape)}")
    w = w.float().clone()
    hessian = hessian.to(w.device)
    order = torch.argsort(torch.diag(hessian), descending=True, stable=True) if act_order else torch.arange(cols, device=w.device)
    w, hessian = w[:, order], hessian[order][:, order]
    u = _inverse_cholesky(hessian, damp)
    scale = grid.per_column(grid.scale, cols)[:, order]
    zero = grid.per_column(grid.zero, cols)[:, order] if grid.zero is not None else torch.zeros_like(scale)
    safe = torch.where(scale != 0, scale, torch.ones_like(scale))  # ggml's Q4_0/K types store negative scales
    # Rounding as round-to-nearest does it (x / scale in float32): so that under H = I the codes are
    # RTN's bit for bit. Consecutive-integer codebooks (int-k) round half to even like torch.round;
    # others take the nearest entry (ties to the lower, as NF's nearest_code), + zero exact in float64.
    size = grid.codebook.numel()
    integer = torch.equal(grid.codebook, grid.codebook[0] + torch.arange(size, device=w.device))
    midpoints = ((grid.codebook[1:] + grid.codebook[:-1]) / 2).double()

    def nearest(x: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        if integer:
            return (torch.round(x) + zero - grid.codebook[0]).clamp(0, size - 1).long()
        return torch.bucketize(x.double() + zero.double(), midpoints)

    codes = torch.empty(rows, cols, dtype=torch.uint8, device=w.device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()
        errors = torch.empty(rows, end - start, device=w.device)
        for j in range(end - start):
            i = start + j
            column = block[:, j]
            code = nearest(column / safe[:, i], zero[:, i])
            codes[:, i] = grid.code_of[code]
            err = (column - (grid.codebook[code] - zero[:, i]) * scale[:, i]) / u[i, i]
            block[:, j:] -= err[:, None] * u[i, i:end][None, :]
            errors[:, j] = err
        w[:, end:] -= errors @ u[start:end, end:]
    result = torch.empty_like(codes)
    result[:, order] = codes
    return result


def gptq(w: torch.Tensor, format: str | Format, hessian: torch.Tensor, *, dtype: torch.dtype | None = None,
         damp: float = 0.01, act_order: bool = False) -> QuantizedTensor:
    """``w`` (out, in) quantized to ``format`` with GPTQ's rounding under ``hessian`` (in, in)."""
    fmt = get_format(format)
    dtype = dtype or w.dtype
    w = check_weight(w)
    grid, tensors = format_grid(w, fmt)
    offset = fmt.decode_offset(tensors, *w.shape)
    if offset is not None:  # a constant per block (d·q + m): the codes round what is left of w once it is taken off
        w = w - grid.per_column(offset.to(w.device), w.shape[1])
    codes = gptq_codes(w, grid, hessian, damp=damp, act_order=act_order)
    return QuantizedTensor(fmt, tuple(w.shape), pack(codes, fmt.bits), tensors, dtype)


class _Stop(Exception):
    pass


@contextmanager
def _swapped(model: nn.Module, layers: Mapping[str, nn.Module]) -> Iterator[None]:
    """``layers`` at their names in ``model`` for the ``with`` block; the originals back afterwards."""
    originals = {name: model.get_submodule(name) for name in layers}
    try:
        for name, layer in layers.items():
            set_module(model, name, layer)
        yield
    finally:
        for name, layer in originals.items():
            set_module(model, name, layer)


class LayerwiseHessians:
    """H = mean over calibration tokens of x xᵀ for each target matrix, one decoder layer at a time.

    Ask for the Hessians in module order (``hessian(name)``); between asks the caller quantizes
    the target layers, in place or into ``stand_ins`` (name -> quantized layer, filled as it goes).
    Before the first matrix of decoder layer i is answered, the calibration inputs are pushed
    through layer i − 1 as it then is, with its stand-ins swapped in for that pass only.
    """

    def __init__(self, model: nn.Module, tokenizer, names: list[str], texts: list[str] | None = None, *,
                 block_size: int = 512, max_blocks: int = 64, batch_size: int = 4, progress: bool = True,
                 stand_ins: Mapping[str, nn.Module] | None = None):
        blocks = calibration_blocks(tokenizer, texts, block_size, max_blocks)
        if len(blocks) == 0:
            raise ValueError(f"the calibration text holds fewer than {block_size} tokens; give more text")
        self.model, self.names, self.stand_ins = model, names, {} if stand_ins is None else stand_ins
        try:
            self.path, self.layers = decoder_layers(model, names)
        except ValueError:
            self.path, self.layers = "", None
        outside = [n for n in names if self.layers is None or not n.startswith(self.path + ".")]
        if outside:
            raise ValueError(f"GPTQ calibrates decoder layer by decoder layer, but {outside[:3]} lie outside the "
                             "model's list of decoder layers; leave them out with skip_modules=")
        self.layer_of = {n: int(n[len(self.path) + 1:].split(".")[0]) for n in names}
        self.current = -1
        self.hessians: dict[str, torch.Tensor] = {}
        self.was_training = model.training
        model.eval()
        self.bar = tqdm(total=len(self.layers), disable=not progress, desc="gptq calibration", unit="layer")
        self.inputs = self._first_inputs(blocks, batch_size)
        self.tokens = blocks.numel()

    def _first_inputs(self, blocks: torch.Tensor, batch_size: int) -> list[tuple[tuple, dict]]:
        captured = []

        def capture(module, args, kwargs):
            captured.append((args, kwargs))
            raise _Stop

        device = next(self.model.parameters()).device
        handle = self.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in blocks.split(batch_size):
                    try:
                        self.model(input_ids=batch.to(device), use_cache=False)
                    except _Stop:
                        pass
        finally:
            handle.remove()
        return captured

    def hessian(self, name: str) -> torch.Tensor:
        """float32 (in, in) Hessian of target ``name``, with every earlier decoder layer as it is now."""
        index = self.layer_of[name]
        if index < self.current:
            raise ValueError(f"{name} lies in decoder layer {index}, which was already calibrated; ask in module order")
        while self.current < index:
            self._advance()
        if name not in self.hessians:
            raise ValueError(f"{name} was not reached by the calibration forward of its decoder layer")
        return self.hessians.pop(name)

    def _run(self, layer: nn.Module) -> list:
        with torch.no_grad():
            return [layer(*args, **kwargs) for args, kwargs in self.inputs]

    def _advance(self) -> None:
        if self.current >= 0:  # inputs of the next layer: through this one as it is now (quantized)
            prefix = f"{self.path}.{self.current}."
            with _swapped(self.model, {n: m for n, m in self.stand_ins.items() if n.startswith(prefix)}):
                outputs = self._run(self.layers[self.current])
            self.inputs = [((out[0] if isinstance(out, tuple) else out,) + args[1:], kwargs)
                           for out, (args, kwargs) in zip(outputs, self.inputs)]
        self.current += 1
        layer = self.layers[self.current]
        prefix = f"{self.path}.{self.current}."
        here = {n: self.model.get_submodule(n) for n in self.names if n.startswith(prefix)}
        sums = {n: None for n in here}
        last: dict = {}  # q/k/v (and gate/up) read one tensor: its XᵀX is computed once
        handles = [module.register_forward_hook(self._accumulate(n, sums, last)) for n, module in here.items()]
        try:
            self._run(layer)
        finally:
            for h in handles:
                h.remove()
        self.hessians.update({n: s / self.tokens for n, s in sums.items() if s is not None})
        self.bar.update(1)

    def close(self) -> None:
        """Give the model back its training mode; the progress bar ends."""
        self.model.train(self.was_training)
        self.bar.close()

    @staticmethod
    def _accumulate(name: str, sums: dict, last: dict) -> Callable:
        def hook(module, args, output):
            x = args[0]
            if last.get("x") is not x:  # held, so no later tensor can be mistaken for it
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                last["x"], last["xtx"] = x, flat.t() @ flat
            sums[name] = last["xtx"] if sums[name] is None else sums[name] + last["xtx"]
        return hook
