"""Text data: the embedded default corpus, user datasets, and fixed-length token blocks.

The default corpus is the Python documentation's topic pages that ship with
every CPython (``pydoc_data.topics``, about 465k characters of real English
technical text). Topics go to the held-out split by a stable hash of their
name (CRC-32 mod 10 == 0, about a tenth), so the split is the same on every
machine and run.
"""

from __future__ import annotations

import os
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
    return _full_blocks(ids, block_size, "the text")


def _full_blocks(tokens: torch.Tensor, block_size: int, what: str) -> torch.Tensor:
    """A 1-D token stream cut into whole blocks (the tail dropped): (n, block_size)."""
    n = tokens.numel() // block_size
    if n == 0:
        raise ValueError(f"{what} holds {tokens.numel()} tokens, fewer than one block of {block_size}")
    return tokens[: n * block_size].view(n, block_size)


def completion_blocks(tokenizer, pairs: list[tuple[str, str]], block_size: int = 512
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, completion) pairs concatenated (each completion ended by EOS, as ``token_blocks`` separates
    texts) and cut into full blocks: the token ids and their labels, -100 on every prompt token, so that a
    causal-LM loss learns only the completions (a task's answer, not its passage). Each pair is tokenized
    whole and its prompt's own token count masked, as lm-evaluation-harness splits a context from its
    continuation."""
    sep = tokenizer.eos_token or "\n\n"
    ids, labels = [], []
    for prompt, completion in pairs:
        whole = tokenizer(prompt + completion + sep, return_tensors="pt", add_special_tokens=False).input_ids[0]
        masked = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.shape[1]
        ids.append(whole)
        labels.append(torch.cat([torch.full((masked,), -100, dtype=whole.dtype), whole[masked:]]))
    return tuple(_full_blocks(torch.cat(stream), block_size, "the pairs") for stream in (ids, labels))


def calibration_blocks(tokenizer, texts: list[str] | None = None, block_size: int = 512,
                       max_blocks: int | None = 64) -> torch.Tensor:
    """The first ``max_blocks`` token blocks of ``texts`` (default: the embedded corpus's train split):
    what a calibration (the Fisher, GPTQ's Hessians) reads."""
    if texts is None:
        texts = default_corpus()["train"]["text"]
    return token_blocks(tokenizer, texts, block_size)[:max_blocks]


_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _heldout(text: str, every: int) -> bool:
    return zlib.crc32(text.encode()) % every == 0


def load_texts(
    source: str | os.PathLike | None = None,
    split: str = "train",
    *,
    tokenizer=None,
    text_field: str = "text",
    messages_field: str = "messages",
    heldout_every: int = 10,
) -> list[str]:
    """The texts of one split of a dataset, through ``datasets``.

    source: None (the embedded corpus), a folder written by ``Dataset.save_to_disk``
    (a DatasetDict's split is used when it has one), or a .txt / .json / .jsonl /
    .parquet file. Records carry a ``text_field`` string or ``messages_field`` chat
    messages (rendered with ``tokenizer``'s chat template). A file or a dataset
    without the asked split is split by a stable hash of each text: one in
    ``heldout_every`` goes to "test", the rest to "train".
    """
    import datasets

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if source is None:
        return list(default_corpus(heldout_every)[split]["text"])
    path = os.fspath(source)
    if os.path.isdir(path):
        data = datasets.load_from_disk(path)
        if isinstance(data, datasets.DatasetDict):
            if split in data:
                return _render(data[split], path, tokenizer, text_field, messages_field)
            if "train" not in data:
                raise ValueError(f"{path} has splits {list(data)}; qft reads 'train' (and 'test' if present)")
            data = data["train"]
    elif os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in _FILE_BUILDERS:
            raise ValueError(f"cannot read {path}: use a .txt, .json, .jsonl or .parquet file, or a save_to_disk folder")
        kwargs = {"sample_by": "document"} if ext == ".txt" else {}
        data = datasets.load_dataset(_FILE_BUILDERS[ext], data_files=path, split="train", **kwargs)
    else:
        raise FileNotFoundError(f"no dataset at {path}")
    texts = _render(data, path, tokenizer, text_field, messages_field)
    return [t for t in texts if _heldout(t, heldout_every) == (split == "test")]


def _render(data, path: str, tokenizer, text_field: str, messages_field: str) -> list[str]:
    if text_field in data.column_names:
        return [t for t in data[text_field] if t]
    if messages_field in data.column_names:
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"{path} holds chat messages; pass a tokenizer that has a chat template")
        return [tokenizer.apply_chat_template(m, tokenize=False) for m in data[messages_field]]
    raise ValueError(
        f"{path} has columns {data.column_names}; name the text column with text_field= "
        f"or the chat column with messages_field="
    )
