"""quantize_and_prepare: the one front door.

Finds the target Linear layers, optionally measures the Fisher, picks one
format per matrix under the bit budget (or uses one fixed format), decomposes
each weight, swaps nn.Linear for QLinear and freezes all but the low-rank
factors. The model is changed in place and returned; ``model.qft_report``
says what was done.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from qft.allocate import allocate, error_table, pruned_grid
from qft.decompose.lqlora import lqlora
from qft.fisher import empirical_fisher
from qft.formats import Format, get_format
from qft.nn import QLinear
from qft.solvers import Solution
from qft.targets import DEFAULT_SKIP, find_target_linears, set_module
from qft.tensor import QuantizedTensor

logger = logging.getLogger(__name__)

# method -> LQ-LoRA iterations (None: no decomposition, PEFT-style LoRA init)
METHODS = {"lqlora": "iterative", "loftq": 1, "qlora": None}
INIT = {"lqlora": "svd", "loftq": "zero"}


@dataclass
class MatrixReport:
    name: str
    shape: tuple[int, int]
    format: str
    bits: float  # real bits per parameter of the quantized part
    error: float  # ||W - Q - L1L2||² (Fisher-weighted when used)
    relative_error: float


@dataclass
class Report:
    method: str
    budget: float | str
    rank: int
    fisher: bool
    matrices: list[MatrixReport] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> reason
    bits: float = 0.0  # average real bits per target parameter, quantized part only
    bits_with_low_rank: float = 0.0  # ... plus the low-rank factors as stored (fp32)
    total_error: float = 0.0
    solution: Solution | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"qft {self.method}: {len(self.matrices)} matrices, budget {self.budget}, rank {self.rank}"
            + (", Fisher-weighted" if self.fisher else ""),
            f"  average bits/param: {self.bits:.4f} (quantized), {self.bits_with_low_rank:.4f} (with low-rank factors)",
            f"  total error {self.total_error:.6g}, {self.seconds:.0f} s",
        ]
        if self.solution is not None:
            s = self.solution
            lines.append(f"  allocation: {s.solver} {s.status}, gap {s.gap:.2e}, {s.seconds:.2f} s")
        for name, reason in self.skipped.items():
            lines.append(f"  skipped {name}: {reason}")
        return "\n".join(lines)


def _skipped_modules(model: nn.Module, targets: dict[str, nn.Linear], skip) -> dict[str, str]:
    """Weight-bearing modules left as they are, and why."""
    skipped = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name in targets or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if isinstance(module, nn.Embedding) or any(s in name for s in skip):
            skipped[name] = "excluded by default (embeddings and output head)"
        elif isinstance(module, nn.Linear):
            skipped[name] = "not in target_modules"
        else:
            skipped[name] = f"unsupported module type {type(module).__name__}"
    return skipped


def quantize_and_prepare(
    model: nn.Module,
    bits: float | str = 2.5,
    method: str = "lqlora",
    rank: int = 64,
    *,
    calibration: list[str] | None = None,
    fisher: bool | dict[str, torch.Tensor] = False,
    tokenizer=None,
    target_modules: list[str] | None = None,
    formats: list[str | Format] | None = None,
    iters: int = 10,
    seed: int = 0,
    solver: str = "auto",
    cache_dir=None,
    progress: bool = True,
) -> nn.Module:
    """Quantize ``model``'s projections and leave only high-precision parts trainable.

    bits: average bits per parameter of the quantized parts (the ILP picks one NF
      configuration per matrix), or a format name such as "nf4" or "nf3-b64-dq8b256"
      to use one format everywhere.
    method: "lqlora" (iterative Q + L1L2), "loftq" (PEFT's one-step LoftQ), "qlora"
      (plain quantization, LoRA factors initialised as PEFT does).
    fisher: weight errors by the empirical Fisher over ``calibration`` texts
      (default: the embedded corpus's train split); needs ``tokenizer``. A dict
      (name -> Fisher diagonal, as ``qft.fisher.empirical_fisher`` returns) is used as given.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    if method != "qlora" and rank == 0:
        raise ValueError(f"method {method!r} needs rank >= 1 (use method='qlora' with rank=0 for plain quantization)")
    if fisher is True and tokenizer is None:
        raise ValueError("fisher=True needs the tokenizer to read the calibration text")
    if not isinstance(bits, str) and not isinstance(bits, (int, float)):
        raise ValueError(f"bits must be a number (average budget) or a format name, got {bits!r}")
    start = time.perf_counter()
    targets = find_target_linears(model, target_modules)
    for name, layer in targets.items():
        if not torch.isfinite(layer.weight).all():
            raise ValueError(f"{name}.weight holds NaN or Inf values; fix the model before quantizing")
    report = Report(method, bits, rank, fisher is True or isinstance(fisher, dict))
    report.skipped = _skipped_modules(model, targets, DEFAULT_SKIP)
    weights = {name: layer.weight.detach() for name, layer in targets.items()}

    fisher_map = fisher if isinstance(fisher, dict) else None
    if fisher is True:
        fisher_map = empirical_fisher(model, tokenizer, targets, calibration, progress=progress)
    if fisher_map is not None:
        missing, extra = set(targets) - set(fisher_map), set(fisher_map) - set(targets)
        if missing or extra:
            raise ValueError(f"the Fisher dict must have one entry per target layer; "
                             f"missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
        for name, f in fisher_map.items():
            if tuple(f.shape) != tuple(weights[name].shape):
                raise ValueError(f"Fisher of {name} has shape {tuple(f.shape)}, its weight {tuple(weights[name].shape)}")

    if isinstance(bits, str):
        chosen = [get_format(bits)] * len(weights)
    else:
        decomposed_rank = rank if method != "qlora" else 0
        grid = pruned_grid(weights, decomposed_rank, fisher=fisher_map, formats=formats, seed=seed,
                           cache_dir=cache_dir, progress=progress)
        table = error_table(weights, grid, decomposed_rank, fisher=fisher_map, seed=seed,
                            cache_dir=cache_dir, progress=progress)
        chosen, report.solution = allocate(table, float(bits), solver=solver)

    iterations = {"iterative": iters, 1: 1, None: None}[METHODS[method]]
    quant_bits = low_rank_bits = numel = 0
    for (name, layer), fmt in tqdm(list(zip(targets.items(), chosen)), disable=not progress, desc=method, unit="matrix"):
        w = weights[name]
        f = None if fisher_map is None else fisher_map[name]
        if iterations is None:
            qlinear = QLinear.from_linear(layer, fmt, rank=rank, seed=seed)
            diff = w.float() - qlinear.qweight.dequantize()
            error = float(((1.0 if f is None else f) * diff**2).sum())
        else:
            d = lqlora(w, fmt, rank, fisher=f, iters=iterations, init=INIT[method], seed=seed)
            qlinear = QLinear(d.qweight, layer.bias, rank=rank, alpha=rank, lora_a=d.L2, lora_b=d.L1, seed=seed)
            error = d.error
        set_module(model, name, qlinear.to(w.device))
        qt: QuantizedTensor = qlinear.qweight
        quant_bits += 8 * qt.nbytes
        low_rank_bits += sum(8 * p.numel() * p.element_size() for p in (qlinear.lora_A, qlinear.lora_B) if p is not None)
        numel += qt.numel
        norm = float(((1.0 if f is None else f) * w.float() ** 2).sum())
        report.matrices.append(MatrixReport(name, qt.shape, fmt.name, 8 * qt.nbytes / qt.numel, error,
                                            (error / max(norm, 1e-30)) ** 0.5))
        report.total_error += error

    for pname, p in model.named_parameters():
        p.requires_grad_(pname.endswith(("lora_A", "lora_B")))
    report.bits = quant_bits / numel
    report.bits_with_low_rank = (quant_bits + low_rank_bits) / numel
    report.seconds = time.perf_counter() - start
    model.qft_report = report
    logger.info("%s", report.summary())
    return model
