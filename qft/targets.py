"""Which Linear layers of a model get quantized."""

from __future__ import annotations

from torch import nn

DEFAULT_SKIP = ("lm_head", "embed")


def find_target_linears(
    model: nn.Module,
    target_modules: list[str] | None = None,
    skip: tuple[str, ...] = DEFAULT_SKIP,
) -> dict[str, nn.Linear]:
    """nn.Linear layers by qualified name.

    ``target_modules``: keep only layers whose name ends with one of these
    (e.g. ["q_proj", "v_proj"]); default all. Layers whose name contains one of
    ``skip`` (embeddings and the output head by default) are left alone.
    """
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(s in name for s in skip):
            continue
        if target_modules is None or any(name == t or name.endswith("." + t) for t in target_modules):
            found[name] = module
    if not found:
        raise ValueError(
            f"no nn.Linear layer of the model matches target_modules={target_modules} (skipping {skip}); "
            "check the names with [n for n, _ in model.named_modules()]"
        )
    return found


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` (e.g. "model.layers.0.mlp.up_proj") of ``model``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
