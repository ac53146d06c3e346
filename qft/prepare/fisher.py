"""Empirical diagonal Fisher of the target weights over calibration text.

F = mean over blocks of (∂ loss / ∂ W)², one block of tokens being one example;
accumulated in place (never stored per example).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from qft.files.data import calibration_blocks
from qft.nn.qlinear import oriented


def empirical_fisher(
    model: nn.Module,
    tokenizer,
    targets: dict[str, nn.Module],
    texts: list[str] | None = None,
    *,
    block_size: int = 512,
    max_blocks: int = 64,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Fisher diagonal per target weight: float32, (out_features, in_features) (a Conv1D's is transposed
    to match). Default text: the corpus's train split."""
    blocks = calibration_blocks(tokenizer, texts, block_size, max_blocks)
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    weights = {name: layer.weight for name, layer in targets.items()}
    saved_grads = {name: w.grad for name, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    fisher = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for ids in tqdm(blocks, disable=not progress, desc="fisher", unit="block"):
                ids = ids[None].to(weights[next(iter(weights))].device)
                model(ids, labels=ids).loss.backward()
                unreached = [name for name, w in weights.items() if w.grad is None]
                if unreached:
                    raise ValueError(f"the model's forward never uses {unreached[:3]} (no gradient reached them); "
                                     "leave them out with target_modules= or skip_modules=")
                for name, w in weights.items():
                    fisher[name].add_(w.grad.float() ** 2)
                    w.grad = None
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
        for name, w in weights.items():
            w.grad = saved_grads[name]
        model.train(was_training)
    return {name: oriented(targets[name], f) / len(blocks) for name, f in fisher.items()}
