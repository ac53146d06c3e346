"""Perplexity on held-out text."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from qft.files.data import default_corpus, token_blocks


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    texts: list[str] | torch.Tensor | None = None,
    *,
    block_size: int = 512,
    batch_size: int = 4,
    max_blocks: int | None = None,
    progress: bool = True,
) -> float:
    """exp(mean next-token NLL) over non-overlapping blocks (default: the corpus's held-out split).

    texts: strings, or token blocks already cut (a LongTensor (n, block_size)).
    max_blocks: evaluate only the first blocks (a quicker, still deterministic, estimate).
    """
    if texts is None:
        texts = default_corpus()["test"]["text"]
    blocks = texts if isinstance(texts, torch.Tensor) else token_blocks(tokenizer, texts, block_size)
    blocks = blocks[:max_blocks]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in tqdm(range(0, len(blocks), batch_size), disable=not progress, desc="perplexity", unit="batch"):
            ids = blocks[start : start + batch_size].to(device)
            logits = model(ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)
