"""Text data: the embedded default corpus.

The default corpus is the Python documentation's topic pages that ship with
every CPython (``pydoc_data.topics``, about 465k characters of real English
technical text). Topics go to the held-out split by a stable hash of their
name (CRC-32 mod 10 == 0, about a tenth), so the split is the same on every
machine and run.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from datasets import DatasetDict


def default_corpus(heldout_every: int = 10) -> DatasetDict:
    """The pydoc topics as a DatasetDict with "train" and "test" splits (columns: topic, text)."""
    from pydoc_data.topics import topics

    from datasets import Dataset, DatasetDict

    splits: dict[str, dict[str, list[str]]] = {
        "train": {"topic": [], "text": []},
        "test": {"topic": [], "text": []},
    }
    for name in sorted(topics):
        split = "test" if zlib.crc32(name.encode()) % heldout_every == 0 else "train"
        splits[split]["topic"].append(name)
        splits[split]["text"].append(topics[name])
    return DatasetDict({k: Dataset.from_dict(v) for k, v in splits.items()})


def token_blocks(tokenizer, texts: list[str], block_size: int = 512) -> torch.Tensor:
    """Concatenate texts (separated by EOS), tokenize, cut into full blocks: LongTensor (n, block_size)."""
    sep = tokenizer.eos_token or "\n\n"
    ids = tokenizer(sep.join(texts), return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = ids.numel() // block_size
    if n == 0:
        raise ValueError(f"the text holds {ids.numel()} tokens, fewer than one block of {block_size}")
    return ids[: n * block_size].view(n, block_size)
