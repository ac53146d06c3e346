"""QA-LoRA (Xu et al., ICLR 2024): LoRA on group-averaged inputs, so the trained model stays a quantized model.

The weight is quantized as it is (RTN, or GPTQ with ``rounding="gptq"``) in a format that stores a
float offset per block (llama.cpp's Q4_1 / Q5_1: d·q + m); the LoRA reads x averaged over each of
the format's blocks (``QLinear(pool=block)``: A is (rank, n_blocks), B = 0 at the start, A
PEFT-initialised over the n_blocks pooled inputs). Its update scaling·B·A / len(block) is then one
number per (row, block), which :func:`merge_qalora` adds to that block's offset: the merged model
is the same quantized model with new offsets, rounded once to their stored dtype (fp16; to nearest,
or by GPTQ so that the rows' outputs keep updates smaller than that rounding), and exports to GGUF
as llama.cpp's own Q4_1 / Q5_1 bytes.

Any format trains (the pool is its block size); only formats whose offset qft can rewrite
(``Format.encode_offset``: q4_1, q5_1) merge exactly, and a budget allocates over those.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qft.methods import ROUNDINGS, Built, MethodOptions, quantize, register_method, weighted_error
from qft.methods.gptq import LayerwiseHessians
from qft.nn import QLinear, qft_layers
from qft.quant.formats import Format, get_format
from qft.quant.formats.base import check_choice
from qft.quant.tensor import QuantizedTensor

logger = logging.getLogger(__name__)

DEFAULT_FORMAT = "q4_1"
EXACT_MERGE = ("q4_1", "q5_1")  # formats whose per-block offset absorbs the pooled update (encode_offset)


def offset_grid() -> list[Format]:
    """A budget's candidates: the formats a QA-LoRA model merges into exactly."""
    return [get_format(name) for name in EXACT_MERGE]


@register_method("qalora", needs_rank=True, table_rank=lambda rank: 0, grid=offset_grid, default_rank=64,
                 description="QA-LoRA: quantization + LoRA on block-averaged inputs, merged into the offsets")
def build(w: torch.Tensor, bias: torch.Tensor | None, fmt: Format, options: MethodOptions) -> Built:
    qweight = quantize(w, fmt, options)
    layer = QLinear(qweight, bias, rank=options.rank, alpha=options.alpha, generator=options.generator,
                    pool=qweight.block)
    return Built(layer, weighted_error(w, qweight.dequantize(torch.float32), options.fisher))


def offset_update(layer: QLinear) -> torch.Tensor:
    """float32 (out, n_groups): what a pooled layer's LoRA adds to each (row, group) of its weight,
    scaling·(B·A)[r, g] / len(g)."""
    if not layer.pool or not layer.rank:
        raise ValueError("offset_update needs a QLinear with a pooled LoRA (QLinear(pool=...), method 'qalora')")
    with torch.no_grad():
        product = layer.lora_B.float() @ layer.lora_A.float()
        return layer.scaling * product / layer._group_lengths(product.device)


def _merge_target(name: str, layer: QLinear) -> torch.Tensor:
    """float32 (out, n_blocks): the layer's offsets plus its pooled LoRA's update, before the stored dtype rounds
    them; a ValueError when the layer's format cannot take them."""
    weight = layer.weight
    fmt = weight.format
    offset = weight.offset()
    if getattr(fmt, "encode_offset", None) is None or offset is None:
        raise ValueError(f"{name} is {fmt.name}, which stores no offset qft can rewrite: a QA-LoRA model merges "
                         f"exactly only in {', '.join(EXACT_MERGE)} (train with QALoRAConfig(bits='q4_1')); "
                         "export it merged and dense instead (export_dense, export_gguf(adapters='merged'))")
    if weight.block != layer.pool:
        raise ValueError(f"{name} pools its LoRA over groups of {layer.pool} columns but {fmt.name} stores one "
                         f"offset per {weight.block}: the update is not constant within a block")
    target = offset.float() + offset_update(layer).to(offset.device)
    try:
        fmt.encode_offset(weight.tensors, target, weight.rows, weight.cols)
    except (ValueError, NotImplementedError) as e:
        raise ValueError(f"{name} ({fmt.name}): its offsets cannot take the merged update ({e}); a QA-LoRA model "
                         f"merges exactly only in {', '.join(EXACT_MERGE)}") from e
    return target


def _merged_weight(weight: QuantizedTensor, offsets: torch.Tensor) -> QuantizedTensor:
    return weight.replace(**weight.format.encode_offset(weight.tensors, offsets, weight.rows, weight.cols))


def _swap_merged(layer: QLinear, weight: QuantizedTensor) -> None:
    layer._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
    layer.lora_A = layer.lora_B = None
    layer.rank, layer.pool, layer.scaling = 0, 0, 0.0
    layer.dense_cache = None  # dequant(W) of the unmerged weight: stale now
    layer._link_scale()


def _block_hessian(hessian: torch.Tensor, block: int) -> torch.Tensor:
    """(n_blocks, n_blocks) E[S Sᵀ] of the inputs' block sums S_g = Σ_{j in block g} x_j, from E[x xᵀ]."""
    cols = hessian.shape[0]
    sums = torch.zeros(cols, -(-cols // block), dtype=hessian.dtype, device=hessian.device)
    sums[torch.arange(cols), torch.arange(cols) // block] = 1
    return sums.t() @ hessian @ sums


def _round_offsets(target: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """``target`` (rows, n_blocks) rounded to fp16 block by block, GPTQ's way: each block's rounding error is
    spread over the row's later blocks through the inverse Hessian's Cholesky factor."""
    h = hessian.double().clone()
    h += damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(len(h), dtype=h.dtype, device=h.device)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    left = target.double().clone()
    out = torch.empty_like(left)
    for g in range(left.shape[1]):
        out[:, g] = left[:, g].half().double()
        err = (left[:, g] - out[:, g]) / upper[g, g]
        left[:, g + 1:] -= err[:, None] * upper[g, g + 1:][None, :]
    return out.float()


def merge_qalora(model: nn.Module, *, rounding: str = "rtn", tokenizer=None, calibration: list[str] | None = None,
                 progress: bool = True) -> nn.Module:
    """Fold every pooled LoRA (QA-LoRA) into its layer's quantized offsets and remove it (rank 0), in place.

    The merged weights equal the trained model's up to one rounding of each new offset to the format's
    stored dtype (fp16 for q4_1 / q5_1); codes and scales are untouched. That rounding is not small next
    to what training changed: an update below half an fp16 ulp of the block's offset is rounded away
    (on SmolLM2 at Q4_1, round to nearest loses 1.2 % of perplexity this way). ``rounding="gptq"``
    chooses each offset's rounding, up or down, as GPTQ chooses codes, under the Hessian of the block sums
    of the layer's inputs (over ``calibration`` texts, default the embedded corpus's train split; needs
    ``tokenizer``): later blocks of a row absorb the error of earlier ones, so the rows' outputs keep the
    update. Every layer is checked before any changes, so a ValueError (a format without a rewritable
    offset) leaves the model as it was. Returns ``model``."""
    check_choice("rounding", rounding, ROUNDINGS)
    if rounding == "gptq" and tokenizer is None:
        raise ValueError("rounding='gptq' needs the tokenizer to read the calibration text (tokenizer=...)")
    layers = {n: m for n, m in qft_layers(model, (QLinear,)).items() if m.pool and m.rank}
    if not layers:
        raise ValueError("the model has no QLinear with a pooled LoRA to merge (prepare it with "
                         "qft.QALoRAConfig; a model merged already has none left)")
    targets = {name: _merge_target(name, layer) for name, layer in layers.items()}
    if rounding == "rtn":
        for name, layer in layers.items():
            _swap_merged(layer, _merged_weight(layer.weight, targets[name]))
    else:  # in module order: each layer's Hessian comes from inputs through the layers merged before it
        hessians = LayerwiseHessians(model, tokenizer, list(layers), calibration, progress=progress)
        try:
            for name, layer in layers.items():
                blocks = _block_hessian(hessians.hessian(name), layer.weight.block)
                _swap_merged(layer, _merged_weight(layer.weight, _round_offsets(targets[name], blocks)))
        finally:
            hessians.close()
    logger.info("merged the pooled LoRA of %d layers into their quantized offsets", len(layers))
    return model
