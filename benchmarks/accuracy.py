"""Zero-shot accuracy and perplexity of quantized models, peers side by side (issue 25's table).

    python benchmarks/accuracy.py [--model smollm2-135m|gemma3-270m] [--configs fp32 bnb-nf4 ...] [--limit 500]
                                  [--steps 0]

Every config starts from the named model (default: the embedded SmolLM2-135M-Instruct; gemma3-270m
needs its optional packages, qft.files.models.MODELS). Accuracy is qft.evaluate_tasks (lm-eval's
zero-shot scoring, checked against lm-eval itself in tests/test_tasks_lm_eval.py) on arc_easy,
arc_challenge, hellaswag, piqa and winogrande, the first --limit validation documents of each (the same
documents for every config, so differences are paired); perplexity on the embedded corpus's held-out
split (in domain: the calibration and training text's) and on LAMBADA's passages (novels: another
domain), every token scored in blocks of 512.

fp32         the model as shipped (its weights are the values of its GGUF: SmolLM2's Q4_1, Gemma's Q4_K_M)
bnb-nf4      bitsandbytes NF4, block 64, double-quantized scales (QLoRA's format), dequantized
nf3          qft NF3, block 64, 8-bit double-quantized scales (rank 0)
lqlora-B     qft LQ-LoRA at B bits (rank 64), data-free (the headline call's default until issue 25)
lqlora-B-fisher          the same, Fisher-weighted (the embedded corpus's train split: quantize_and_prepare's
                         default since issue 25)
lqlora-B-fisher-gptq     ... and the Q step rounded by GPTQ (the same text)
peqa-int4    PEQA int4 per channel (trained scales)

--steps N trains each config N steps on the embedded corpus (the finetune benchmark's schedule) before
the evaluation (0: as quantized). Results go to benchmarks/out/accuracy/<config>-<steps>.json, one per
config (a rerun skips configs already measured; --fresh redoes them).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from lqlora import CACHE, OUT, bnb_nf4_model, header

import qft
from qft.exports.merged import dense_model
from qft.files.tasks import FIVE_TASKS, task_docs
from qft.prepare.report import markdown_table
from qft.training.evaluate import perplexity
from qft.training.loop import train
from qft.training.tasks import evaluate_tasks

WORK = OUT / "accuracy"
RANK = 64
CONFIGS = ["fp32", "bnb-nf4", "nf3", "lqlora-4.0", "lqlora-3.0", "lqlora-2.5", "lqlora-4.0-fisher",
           "lqlora-3.0-fisher", "lqlora-2.5-fisher", "lqlora-3.0-fisher-gptq", "lqlora-2.5-fisher-gptq", "peqa-int4"]


def fisher_of(model, tokenizer, label: str) -> dict:
    """The empirical Fisher of the model's projections (the embedded corpus's train split), cached per model."""
    from safetensors.torch import load_file, save_file

    path = WORK / f"fisher-{label}.safetensors"
    if path.is_file():
        return load_file(path)
    fisher = qft.empirical_fisher(model, tokenizer, qft.find_target_linears(model), progress=False)
    WORK.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in fisher.items()}, str(path))
    return fisher


def prepared(name: str, model, tokenizer, label: str):
    """The config's model (in place where qft quantizes) and the bits per parameter it stores."""
    if name == "fp32":
        return model, 32.0
    if name == "bnb-nf4":
        return bnb_nf4_model(model), 4 + 8 / 64 + 32 / (64 * 256)
    if name == "nf3":
        config = qft.QLoRAConfig(bits="nf3-b64-dq8b256", rank=0)
    elif name.startswith("lqlora-"):
        bits = float(name.split("-")[1])
        config = qft.LQLoRAConfig(bits=bits, rank=RANK, fisher="-fisher" in name,
                                  rounding="gptq" if name.endswith("-gptq") else None)
    elif name == "peqa-int4":
        config = qft.PEQAConfig(bits=4)
    else:
        raise ValueError(name)
    fisher = fisher_of(model, tokenizer, label) if getattr(config, "fisher", False) else None
    qft.quantize_(model, config, tokenizer=tokenizer, fisher=fisher, cache_dir=CACHE, progress=False)
    return model, model.qft_report.bits


def measure(name: str, args, lambada: list[str]) -> dict:
    path = WORK / f"{args.model}-{name}-{args.steps}.json"
    if path.is_file() and not args.fresh:
        return json.loads(path.read_text())
    model, tokenizer = qft.named_model(args.model, progress=False)
    start = time.perf_counter()
    model, bits = prepared(name, model, tokenizer, args.model)
    seconds = time.perf_counter() - start
    if args.steps:
        peqa = name.startswith("peqa")
        train(model, tokenizer, steps=args.steps, batch_size=2, block_size=512, lr=1e-3 if peqa else 2e-4,
              warmup=3, seed=0, progress=False, eval_blocks=0)
    if qft.nn.qft_layers(model):  # the same weights (W' = dequant(Q) + scaling·B·A) without dequantizing per forward
        model = dense_model(model, torch.float32, merged=True)
    scores = evaluate_tasks(model, tokenizer, FIVE_TASKS, limit=args.limit, progress=False)
    row = {"model": args.model, "config": name, "steps": args.steps, "bits/param": bits, "prepare s": seconds}
    for task in FIVE_TASKS:
        row[task] = scores[task]["acc_norm" if "acc_norm" in scores[task] else "acc"]
    row["average"] = sum(row[t] for t in FIVE_TASKS) / len(FIVE_TASKS)
    row["ppl in domain"] = perplexity(model, tokenizer, progress=False)
    row["ppl lambada"] = perplexity(model, tokenizer, lambada, progress=False)
    row["scores"] = scores
    WORK.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--limit", type=int, default=500, help="documents of each task (the first ones)")
    parser.add_argument("--lambada", type=int, default=400, help="LAMBADA passages for the out-of-domain perplexity")
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    header()
    print(f"# tasks {FIVE_TASKS}, first {args.limit} documents each (acc_norm where lm-eval reports it, else acc); "
          f"{args.steps} training steps", flush=True)
    torch.manual_seed(0)
    lambada = [d["text"] for d in task_docs("lambada", limit=args.lambada)]
    rows = []
    for name in args.configs:
        row = measure(name, args, lambada)
        rows.append({k: v for k, v in row.items() if k != "scores"})
        print(rows[-1], flush=True)
    print(markdown_table(rows, ".4f"))


if __name__ == "__main__":
    main()
