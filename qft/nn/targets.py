"""Which Linear-like layers of a model get quantized."""

from __future__ import annotations

from torch import nn

from qft.nn import qft_layers
from qft.nn.qlinear import is_conv1d


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2 style: the same map with the weight stored transposed)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _matches(name: str, patterns) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the module(s) that are the model's output embeddings (lm_head, embed_out, ...)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {n for n, m in model.named_modules(remove_duplicate=False) if head is not None and m is head}
    return names | {n for n, _ in model.named_modules() if _matches(n, ("lm_head",))}


def find_target_linears(
    model: nn.Module,
    target_modules: list[str] | None = None,
    skip_modules: list[str] | None = None,
) -> dict[str, nn.Module]:
    """Linear-like layers by qualified name.

    target_modules: keep only layers whose name is, or ends with ".", one of these
      (e.g. ["q_proj", "v_proj"]); default all.
    skip_modules: leave these alone (same matching). Default: the output head
      (the model's output embeddings); pass [] to quantize it too.
    """
    done = list(qft_layers(model))
    if done:
        raise ValueError(f"the model is already prepared by qft ({len(done)} qft layers, e.g. {done[0]}); "
                         "quantize_and_prepare takes the original float model (reload it to quantize again)")
    skip = output_head_names(model) if skip_modules is None else set(skip_modules)
    found = {}
    for name, module in model.named_modules():
        if not is_linear(module) or _matches(name, skip):
            continue
        if target_modules is None or _matches(name, target_modules):
            found[name] = module
    if not found:
        raise ValueError(
            f"no nn.Linear (or Conv1D) layer of the model matches target_modules={target_modules} "
            f"(skipping {sorted(skip)}); check the names with [n for n, _ in model.named_modules()]"
        )
    return found


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` (e.g. "model.layers.0.mlp.up_proj") of ``model``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
