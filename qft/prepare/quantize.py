"""quantize_(model, config): the one front door, and quantize_and_prepare, its keyword form.

One handler per config shape (``register_handler``). The per-matrix one finds the target Linear layers, optionally measures the Fisher, picks one
format per matrix under the bit budget (or uses one fixed format), lets the
method (``qft.methods``) build a QLinear for each matrix, swaps them all in
once every one is built (an error leaves the model as it was, to retry) and
leaves only the layers' adapters trainable. The model is changed in place and
returned; ``model.qft_config`` and ``model.qft_report`` say what was done.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qft.files.models import tokenizer_of
from qft.prepare.allocate import allocate, error_table, pruned_grid
from qft.methods import MethodOptions, get_method, weighted_error
from qft.methods.config import BudgetConfig, QuantConfig, WholeModelConfig, config_for
from qft.methods.gptq import LayerwiseHessians
from qft.prepare.fisher import empirical_fisher
from qft.quant.formats import Format, get_format
from qft.prepare.hf_quantizer import record_quantization_config
from qft.nn import QLinear, dense_weight, mark_trainable, tied_names
from qft.solvers.mckp import Solution
from qft.prepare.streaming import FileTensors, TargetWeights, open_model
from qft.nn.targets import find_target_linears, is_linear, output_head_names, set_module

logger = logging.getLogger(__name__)


@dataclass
class MatrixReport:
    name: str
    shape: tuple[int, int]
    format: str
    bits: float  # real bits per parameter of the quantized part
    error: float  # ||W − W_layer||²_F, W_layer = Q + scaling·B·A at initialisation: comparable across methods
    relative_error: float  # ||W − W_layer||_F / ||W||_F
    objective: float | None = None  # what the method minimised (``Built.error``): Fisher-weighted, or GPTQ's
    # output error for LQ-LoRA; comparable within one method and rounding only


@dataclass
class Report:
    method: str
    budget: float | str
    rank: int
    fisher: bool
    rounding: str = "rtn"
    matrices: list[MatrixReport] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> reason
    tied: dict[str, str] = field(default_factory=dict)  # module name -> the module whose weight it shares
    notes: list[str] = field(default_factory=list)
    bits: float = 0.0  # average real bits per target parameter, quantized part only
    bits_with_adapters: float = 0.0  # ... plus the adapters (low-rank factors, trained scales) as stored
    total_error: float = 0.0
    solution: Solution | None = None
    seconds: float = 0.0
    calibration: str = "none (data-free)"  # the text the Fisher and GPTQ's Hessians were measured on

    def summary(self) -> str:
        lines = [
            f"qft {self.method}: {len(self.matrices)} matrices, budget {self.budget}, rank {self.rank}"
            + (", Fisher-weighted" if self.fisher else "") + (", GPTQ rounding" if self.rounding == "gptq" else ""),
            f"  average bits/param: {self.bits:.4f} (quantized), {self.bits_with_adapters:.4f} (with adapters)",
            f"  total error {self.total_error:.6g}, {self.seconds:.0f} s",
            f"  calibration: {self.calibration}",
        ]
        if self.solution is not None:
            s = self.solution
            lines.append(f"  allocation: {s.solver} {s.status}, gap {s.gap:.2e}, {s.seconds:.2f} s")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  {name} shares the weight of {first}: quantized once" for name, first in self.tied.items()]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def _skipped_modules(model: nn.Module, targets: dict[str, nn.Module], skip_modules) -> dict[str, str]:
    """Weight-bearing modules left as they are, and why."""
    heads = output_head_names(model) if skip_modules is None else set()
    skipped = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name in targets or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if isinstance(module, nn.Embedding) or name in heads:
            skipped[name] = "excluded by default (embeddings and output head; skip_modules=[] quantizes the head)"
        elif is_linear(module):
            skipped[name] = "not in target_modules, or in skip_modules"
        else:
            skipped[name] = f"unsupported module type {type(module).__name__}"
    return skipped


def _check_weights(targets: dict[str, nn.Module]) -> None:
    for name, layer in targets.items():
        if layer.weight.is_meta:
            raise ValueError(
                f"{name}.weight is on the meta device (offloaded, or not loaded yet); load the model with its "
                "weights in memory (from_pretrained without device_map offloading) before quantizing"
            )
        if not torch.isfinite(layer.weight).all():
            raise ValueError(f"{name}.weight holds NaN or Inf values; fix the model before quantizing")


def _relative(error: float, w: torch.Tensor) -> float:
    """||W − W_layer||_F / ||W||_F from error = ||W − W_layer||²_F."""
    return (error / max(float(w.square().sum()), 1e-30)) ** 0.5


def _check_rank(spec, rank: int, targets: dict[str, nn.Module]) -> None:
    """A method whose error table assumes rank-r adapters (LQ-LoRA, LoftQ) takes a rank-r SVD of every
    matrix: refuse a rank above a matrix's smaller side before any work, not at that matrix."""
    if not spec.table_rank(rank):
        return
    small = {name: tuple(layer.weight.shape) for name, layer in targets.items() if min(layer.weight.shape) < rank}
    if small:
        name, shape = next(iter(small.items()))
        raise ValueError(f"rank {rank} is above the smaller side of {len(small)} target matrices, e.g. {name} "
                         f"{shape}; method {spec.name!r} needs rank <= {min(min(s) for s in small.values())}, "
                         "or leave those layers out with skip_modules=")


HANDLERS: dict[type, Callable[..., nn.Module]] = {}


def register_handler(config_type: type):
    """Decorator: ``handler(model, config, *, tokenizer, calibration, fisher, cache_dir, progress)`` applies
    every config of ``config_type`` (and of its subclasses without a handler of their own)."""

    def wrap(handler):
        HANDLERS[config_type] = handler
        return handler
    return wrap


def quantize_(
    model: nn.Module | str | os.PathLike,
    config: QuantConfig,
    *,
    tokenizer=None,
    calibration: list[str] | None = None,
    fisher: dict[str, torch.Tensor] | None = None,
    cache_dir=None,
    progress: bool = True,
) -> nn.Module:
    """Quantize ``model``'s projections as ``config`` says and leave only the adapters trainable.

    model: a model (changed in place and returned), or a folder with its config.json and safetensors
      files: the model is then built with its target weights on the meta device and each is read from
      disk only while it is measured and quantized, never the whole model in full precision.
    config: ``qft.LQLoRAConfig(bits=2.5, rank=64, fisher=True)``, ``qft.PEQAConfig(bits=4)``,
      ``qft.HALOConfig(level=2)``, ... (``qft.methods.config``).
    tokenizer, calibration: read calibration text (default: the embedded corpus's train split) for
      ``fisher=True`` and ``rounding="gptq"``.
    fisher: a precomputed Fisher (name -> (out, in) diagonal, as ``qft.empirical_fisher`` returns), used
      as given when the config says fisher=True.
    cache_dir: where the error table is cached (default ~/.cache/qft; False: no cache).

    ``model.qft_config`` and ``model.qft_report`` say what was done; both go into every checkpoint.
    """
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a qft config (qft.LQLoRAConfig(...), qft.PEQAConfig(...), ...), "
                         f"got {type(config).__name__}")
    handler = next((HANDLERS[t] for t in type(config).__mro__ if t in HANDLERS), None)
    if handler is None:
        raise ValueError(f"no handler applies a {type(config).__name__}; use a method's own config "
                         "(qft.LQLoRAConfig(...), ...), qft.BudgetConfig or qft.WholeModelConfig")
    return handler(model, config, tokenizer=tokenizer, calibration=calibration, fisher=fisher, cache_dir=cache_dir,
                   progress=progress)


@register_handler(WholeModelConfig)
def _prepare_whole(model: nn.Module, config: WholeModelConfig, *, tokenizer, calibration, fisher, cache_dir,
                   progress: bool) -> nn.Module:
    """A method without a bit budget (``Method.prepare``): it builds its own layers, swapped in here once
    all are built; the report says what they store and how far their weights are from the originals."""
    refuse_budget_options(config.method, {"tokenizer": tokenizer, "calibration": calibration, "fisher": fisher})
    if isinstance(model, (str, os.PathLike)):
        raise ValueError(f"method {config.method!r} trains or rotates whole weights and takes a loaded model, "
                         "not a folder")
    spec = get_method(config.method)
    start = time.perf_counter()
    targets = find_target_linears(model, config.target_modules, config.skip_modules)
    _check_weights(targets)
    layers = spec.prepare(model, targets, rank=config.resolved_rank, alpha=config.alpha, seed=config.seed,
                          progress=progress, **config.options)
    for name, layer in layers.items():  # only once every layer is built: a failure leaves the model as it was
        set_module(model, name, layer)
    report = Report(spec.name, str(config.options), max((m.rank for m in layers.values()), default=0), False)
    report.skipped = _skipped_modules(model, targets, config.skip_modules)
    stored = adapters = numel = 0
    for name, layer in layers.items():
        w = dense_weight(targets[name]).detach().float()  # the original, still held by ``targets``
        trained = set(layer.adapters().values())
        held = sum(8 * t.numel() * t.element_size() for t in layer.state_dict(keep_vars=True).values())
        extra = sum(8 * p.numel() * p.element_size() for p in trained)
        base = held - (extra if layer.peft else 0)
        stored, adapters, numel = stored + base, adapters + (extra if layer.peft else 0), numel + w.numel()
        error = weighted_error(w, layer.merged_weight(), None)
        report.matrices.append(MatrixReport(name, tuple(w.shape), layer.extra_repr(), base / w.numel(), error,
                                            _relative(error, w)))
        report.total_error += error
    mark_trainable(model)
    report.bits = stored / max(numel, 1)
    report.bits_with_adapters = (stored + adapters) / max(numel, 1)
    report.seconds = time.perf_counter() - start
    return _finish(model, config, report)


def _finish(model: nn.Module, config: QuantConfig, report: Report) -> nn.Module:
    """Attach the config and the report, and mark the model as qft-quantized for transformers (its own
    ``save_pretrained``, and so every Trainer checkpoint, then writes a qft checkpoint that records both)."""
    model.qft_config, model.qft_report = config, report
    record_quantization_config(model)
    logger.info("%s", report.summary())
    return model


@register_handler(BudgetConfig)
def _prepare_budget(model: nn.Module | str | os.PathLike, config: BudgetConfig, *, tokenizer, calibration, fisher,
                    cache_dir, progress: bool) -> nn.Module:
    """Matrix by matrix: the Fisher, the error table and the allocation (or one format), then the
    method's ``build`` for each matrix; every layer is built before any is swapped in."""
    streamed = None
    if isinstance(model, (str, os.PathLike)):  # every tensor loaded but the target weights, which stay on disk
        check_streamable(config, fisher)
        model, _, streamed = open_model(model, config.target_modules, config.skip_modules)
    layers, report = plan_budget(model, config, tensors=streamed, tokenizer=tokenizer, calibration=calibration,
                                 fisher=fisher, cache_dir=cache_dir, progress=progress)
    return swap_in(model, config, layers, report)


def streams(config: QuantConfig, fisher=None) -> bool:
    """Whether ``config`` can be applied while reading the weights from disk one at a time: not when it runs
    calibration text through the full-precision model (a Fisher given as a dict was read already)."""
    return (isinstance(config, BudgetConfig) and config.resolved_rounding != "gptq"
            and (not config.fisher or isinstance(fisher, dict)))


def check_streamable(config: BudgetConfig, fisher=None) -> None:
    """A model read from its files one weight at a time cannot run calibration text in full precision."""
    if not streams(config, fisher):
        raise ValueError(f"fisher=True and rounding='gptq' (method {config.method!r} rounds with "
                         f"{config.resolved_rounding!r}) run calibration text through the whole model in full "
                         "precision, which streaming quantization never holds: load the model (from_pretrained) "
                         "and pass it, pass a precomputed Fisher dict, or rounding='rtn'")


def swap_in(model: nn.Module, config: BudgetConfig, layers: dict[str, QLinear], report: Report) -> nn.Module:
    """Put the planned layers in (one object at tied names: still tied) and leave only adapters trainable."""
    for name, qlinear in layers.items():
        set_module(model, name, qlinear)
    mark_trainable(model)
    return _finish(model, config, report)


def _calibration_text(fisher, rounding: str, calibration: list[str] | None) -> str:
    """What the report says was read: which measurement, on which text."""
    given = "Fisher given as a dict; " if isinstance(fisher, dict) else ""
    read = [what for what, on in (("Fisher", fisher is True), ("GPTQ Hessians", rounding == "gptq")) if on]
    if not read:
        return f"{given}no text read" if given else "none (data-free)"
    text = "the embedded corpus's train split" if calibration is None else f"{len(calibration)} given texts"
    return f"{given}{' and '.join(read)} over {text}"


def plan_budget(model: nn.Module, config: BudgetConfig, *, tensors: FileTensors | None = None, tokenizer=None,
                calibration=None, fisher=None, cache_dir=None, progress: bool = True
                ) -> tuple[dict[str, QLinear], Report]:
    """Everything computed, nothing swapped: the QLinear for each target name (tied names share one) and
    the report. With ``tensors`` each target weight is read from the files when needed (the model's own
    target weights may be on the meta device)."""
    spec = get_method(config.method)
    method, rank, alpha, seed, iters = config.method, config.resolved_rank, config.alpha, config.seed, config.iters
    rounding = config.resolved_rounding
    if fisher is not None and not config.fisher:
        raise ValueError("a Fisher dict was given but the config says fisher=False; set fisher=True in the config")
    fisher = fisher if fisher is not None else config.fisher
    if tensors is not None:
        check_streamable(config, fisher)
    if tokenizer is None and (fisher is True or rounding == "gptq") and tensors is None:
        tokenizer = tokenizer_of(model)  # found beside the model's own files, or still None
    if fisher is True and tokenizer is None:
        raise ValueError("fisher=True needs a tokenizer to read the calibration text: pass tokenizer= (none was "
                         "found beside the model's files)")
    if rounding == "gptq" and tokenizer is None:
        raise ValueError("rounding='gptq' needs a tokenizer to read the calibration text: pass tokenizer= (none "
                         "was found beside the model's files)")
    bits = config.fixed_format or config.bits
    fixed = get_format(bits) if isinstance(bits, str) else None
    start = time.perf_counter()
    targets = find_target_linears(model, config.target_modules, config.skip_modules)
    if tensors is None:
        _check_weights(targets)
    _check_rank(spec, rank, targets)
    report = Report(method, bits, rank, fisher is True or isinstance(fisher, dict), rounding)
    report.calibration = _calibration_text(fisher, rounding, calibration)
    report.skipped = _skipped_modules(model, targets, config.skip_modules)

    report.tied = tied_names({name: layer.weight for name, layer in targets.items()})  # tied by the weight
    unique = {name: layer for name, layer in targets.items() if name not in report.tied}
    if tensors is None:
        weights = {name: dense_weight(layer) for name, layer in unique.items()}
    else:
        weights = TargetWeights(tensors, unique)  # each read from disk when needed

    fisher_map = fisher if isinstance(fisher, dict) else None
    if fisher is True:
        fisher_map = empirical_fisher(model, tokenizer, unique, calibration, progress=progress)
    if fisher_map is not None:
        missing = set(weights) - set(fisher_map)
        if missing:
            raise ValueError(f"the Fisher dict must have one entry per target layer; missing {sorted(missing)[:3]}")
        for name in weights:
            if tuple(fisher_map[name].shape) != tuple(weights[name].shape):
                raise ValueError(f"Fisher of {name} has shape {tuple(fisher_map[name].shape)}, "
                                 f"its weight (out, in) {tuple(weights[name].shape)}")

    if fixed is not None:
        chosen = [fixed] * len(weights)
    else:
        table_rank = spec.table_rank(rank)
        candidates = config.formats or (spec.grid() if spec.grid else None)
        grid = pruned_grid(weights, table_rank, fisher=fisher_map, formats=candidates, seed=seed,
                           cache_dir=cache_dir, progress=progress)
        table = error_table(weights, grid, table_rank, fisher=fisher_map, seed=seed,
                            cache_dir=cache_dir, progress=progress)
        fitting = np.where(np.isfinite(table.errors), table.costs, 0)  # a format too coarse-blocked for a matrix: not a choice
        dearest = float(fitting.max(axis=1).sum() / table.numel.sum())
        budget = float(bits)
        if budget > dearest:
            note = (f"budget {budget:g} bits/param is above the dearest candidate allocation ({dearest:.4f}): "
                    "every matrix gets its most precise candidate format")
            logger.warning("%s", note)
            report.notes.append(note)
            budget = dearest
        chosen, report.solution = allocate(table, budget, solver=config.solver)

    built: dict[str, QLinear] = {}
    hessians = None
    if rounding == "gptq":  # each decoder layer calibrates on the ones before it as built (stand-ins)
        hessians = LayerwiseHessians(model, tokenizer, list(unique), calibration, progress=progress, stand_ins=built)
    generator = torch.Generator().manual_seed(seed)  # one stream for every layer's random init
    quant_bits = adapter_bits = numel = 0
    try:
        for (name, layer), fmt in tqdm(list(zip(unique.items(), chosen)), disable=not progress, desc=method,
                                       unit="matrix"):
            w = weights[name].float()
            f = None if fisher_map is None else fisher_map[name].to(w.device)
            hessian = None if hessians is None else hessians.hessian(name)
            options = MethodOptions(rank, alpha, f, seed, generator, iters, layer.weight.dtype, hessian)
            bias = layer.bias
            if bias is not None and bias.is_meta:  # a skeleton's: read from the files too
                bias = tensors[f"{name}.bias"].to(bias.dtype)
            try:
                result = spec.build(w, bias, fmt, options)
            except ValueError as e:
                raise ValueError(f"{name} ({fmt.name}): {e}; the model is left unchanged") from e
            qlinear = result.layer.to(w.device)
            built[name] = qlinear
            qt = qlinear.weight
            stored = fmt.storage_bits(*qt.shape)  # the format's own bits (a trainable scale counts as its stored dtype)
            quant_bits += stored
            # adapters as held: low-rank factors, and what a trainable scale holds beyond the format's storage
            adapter_bits += 8 * qt.nbytes - stored
            adapter_bits += sum(8 * p.numel() * p.element_size() for n, p in qlinear.adapters().items() if n != "scale")
            numel += qt.numel()
            error = weighted_error(w, qlinear.merged_weight(), None)
            report.matrices.append(MatrixReport(name, tuple(qt.shape), fmt.name, stored / qt.numel(), error,
                                                _relative(error, w), result.error))
            report.total_error += error
    finally:
        if hessians is not None:
            hessians.close()
    for name, first in report.tied.items():
        built[name] = built[first]  # one layer object at both places: still tied
    report.bits = quant_bits / numel
    report.bits_with_adapters = (quant_bits + adapter_bits) / numel
    report.seconds = time.perf_counter() - start
    return built, report


def quantize_and_prepare(
    model: nn.Module | str | os.PathLike,
    bits: float | int | str | None = None,
    method: str = "lqlora",
    rank: int | None = None,
    *,
    alpha: float | None = None,
    calibration: list[str] | None = None,
    fisher: bool | dict[str, torch.Tensor] | None = None,
    tokenizer=None,
    target_modules: list[str] | None = None,
    skip_modules: list[str] | None = None,
    formats: list[str | Format] | None = None,
    iters: int = 10,
    seed: int = 0,
    solver: str = "auto",
    rounding: str | None = None,
    cache_dir=None,
    progress: bool = True,
    **method_options,
) -> nn.Module:
    """The keyword form of :func:`quantize_`: builds ``method``'s config from the arguments and applies it.

    ``quantize_and_prepare(model, bits=2.5, method="lqlora", rank=64, fisher=True, tokenizer=tok)`` is
    ``quantize_(model, LQLoRAConfig(bits=2.5, rank=64, fisher=True), tokenizer=tok)``. method: a registered
    method (``qft.methods.METHODS``): "lqlora", "loftq", "qlora", "peqa", "int21", "halo" (whose own
    options, level=, precision=, granularity=, grad_format=, peft=, come as keywords). bits: None takes the
    method's own default (LQ-LoRA: a 2.5-bit budget; QLoRA, LoftQ: nf4; QA-LoRA: q4_1; PEQA: int4 per
    channel; INT2.1: int2-g128); HALO has none and refuses one. fisher: None (the
    default) calibrates whenever it can: a bit budget to allocate, a loaded model (a folder streams) and a
    tokenizer, passed or found beside the model's files (``qft.files.models.tokenizer_of``); otherwise it runs
    data-free and the report's notes say why. False: data-free always; True: Fisher-weighted, or an error; or a
    precomputed Fisher dict. The other arguments are the config's fields (``qft.methods.config``).
    """
    common = dict(rank=rank, alpha=alpha, target_modules=target_modules, skip_modules=skip_modules, seed=seed)
    if get_method(method).prepare is not None:
        refuse_budget_options(method, {"bits": bits is not None, "fisher": fisher, "rounding": rounding,
                                       "formats": formats, "calibration": calibration})
        config = config_for(method, **common, **method_options)
        return quantize_(model, config, progress=progress)
    if method_options:
        raise ValueError(f"quantize_and_prepare got unexpected option(s) {sorted(method_options)}; method {method!r} "
                         "takes none beyond the common arguments")
    if bits is not None:
        common["bits"] = bits
    config = config_for(method, fisher=fisher not in (None, False), rounding=rounding, formats=formats,
                        iters=iters, solver=solver, **common)
    why = None
    if fisher is None:
        config, tokenizer, why = default_calibration(model, config, tokenizer)
    model = quantize_(model, config, tokenizer=tokenizer, calibration=calibration,
                      fisher=fisher if isinstance(fisher, dict) else None, cache_dir=cache_dir, progress=progress)
    return noted(model, why)


def refuse_budget_options(method: str, given: dict[str, object]) -> None:
    """A whole-model method (HALO) has no budget, formats or rounding: say which of ``given`` (name: the value,
    truthy when the caller set it) to drop, rather than ignore them."""
    ignored = [name for name, value in given.items() if value]
    if ignored:
        raise ValueError(f"method {method!r} has no bit budget to allocate or rounding to choose; drop {ignored} "
                         f"(its options: {list(get_method(method).options)})")


def default_calibration(model: nn.Module | str | os.PathLike, config: BudgetConfig, tokenizer
                        ) -> tuple[BudgetConfig, object, str | None]:
    """The default of the keyword form and of ``qft quantize``: Fisher-weighted allocation over the embedded
    corpus (at 2.5 bits on SmolLM2 it cut perplexity 7× on the corpus and on novels alike; benchmarks/RESULTS.md)
    wherever it can run. Returns (config, the tokenizer to read text with, None), or (config unchanged,
    tokenizer, why the call stays data-free)."""
    if config.fixed_format is not None:
        return config, tokenizer, f"data-free: one format ({config.fixed_format}) everywhere, no budget to weight"
    if isinstance(model, (str, os.PathLike)):
        return config, tokenizer, ("data-free: a folder is quantized streaming, without running the model; load "
                                   "the model and pass it to calibrate (or pass a precomputed Fisher dict)")
    tokenizer = tokenizer if tokenizer is not None else tokenizer_of(model)
    if tokenizer is None:
        return config, None, ("data-free: no tokenizer was passed or found beside the model's files; pass "
                              "tokenizer= to calibrate on the embedded corpus (fisher=False: data-free, no note)")
    return dataclasses.replace(config, fisher=True), tokenizer, None


def noted(model: nn.Module, why: str | None) -> nn.Module:
    """Say in the model's report (and the log) why a default left it data-free."""
    if why is not None:
        logger.info("%s", why)
        model.qft_report.notes.append(why)
    return model
