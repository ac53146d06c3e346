"""QA-LoRA (Xu et al., ICLR 2024): LoRA on group-averaged inputs, so the trained model stays a quantized model.

The weight is quantized as it is (RTN, or GPTQ with ``rounding="gptq"``) in a format that stores a
float offset per block (llama.cpp's Q4_1 / Q5_1: d·q + m); the LoRA reads x averaged over each of
the format's blocks (``QLinear(pool=block)``: A is (rank, n_blocks), B = 0 at the start, A
PEFT-initialised over the n_blocks pooled inputs). Its update scaling·B·A / len(block) is then one
number per (row, block), which :func:`merge_qalora` adds to that block's offset: the merged model
is the same quantized model with new offsets, rounded once to their stored dtype (fp16), and
exports to GGUF as llama.cpp's own Q4_1 / Q5_1 bytes.

Any format trains (the pool is its block size); only formats whose offset qft can rewrite
(``Format.encode_offset``: q4_1, q5_1) merge exactly, and a budget allocates over those.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qft.methods import Built, MethodOptions, quantize, register_method, weighted_error
from qft.nn import QLinear, qft_layers
from qft.quant.formats import Format, get_format
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


def _merged_weight(name: str, layer: QLinear) -> QuantizedTensor:
    """The layer's quantized weight with the LoRA's update added to its offsets (rounded once, by the format)."""
    weight = layer.weight
    fmt = weight.format
    encode = getattr(fmt, "encode_offset", None)
    offset = weight.offset()
    if encode is None or offset is None:
        raise ValueError(f"{name} is {fmt.name}, which stores no offset qft can rewrite: a QA-LoRA model merges "
                         f"exactly only in {', '.join(EXACT_MERGE)} (train with QALoRAConfig(bits='q4_1')); "
                         "export it merged and dense instead (export_dense, export_gguf(adapters='merged'))")
    if weight.block != layer.pool:
        raise ValueError(f"{name} pools its LoRA over groups of {layer.pool} columns but {fmt.name} stores one "
                         f"offset per {weight.block}: the update is not constant within a block")
    new_offset = offset.float() + offset_update(layer).to(offset.device)
    try:
        tensors = encode(weight.tensors, new_offset, weight.rows, weight.cols)
    except (ValueError, NotImplementedError) as e:
        raise ValueError(f"{name} ({fmt.name}): its offsets cannot take the merged update ({e}); a QA-LoRA model "
                         f"merges exactly only in {', '.join(EXACT_MERGE)}") from e
    return weight.replace(**tensors)


def merge_qalora(model: nn.Module) -> nn.Module:
    """Fold every pooled LoRA (QA-LoRA) into its layer's quantized offsets and remove it (rank 0), in place.

    The merged weights equal the trained model's up to one rounding of each new offset to the format's
    stored dtype (fp16 for q4_1 / q5_1); codes and scales are untouched. Every layer is computed before any
    changes, so a ValueError (a format without a rewritable offset) leaves the model as it was.
    Returns ``model``."""
    layers = {n: m for n, m in qft_layers(model, (QLinear,)).items() if m.pool and m.rank}
    if not layers:
        raise ValueError("the model has no QLinear with a pooled LoRA to merge (prepare it with "
                         "qft.QALoRAConfig; a model merged already has none left)")
    merged = {name: _merged_weight(name, layer) for name, layer in layers.items()}
    for name, layer in layers.items():
        layer._parameters["weight"] = nn.Parameter(merged[name], requires_grad=False)
        layer.lora_A = layer.lora_B = None
        layer.rank, layer.pool, layer.scaling = 0, 0, 0.0
        layer.dense_cache = None  # dequant(W) of the unmerged weight: stale now
        layer._link_scale()
    logger.info("merged the pooled LoRA of %d layers into their quantized offsets", len(layers))
    return model
