"""GPTQ against round-to-nearest, INT2.1 (LREC) against plain CE, and exports that keep the gain.

    python benchmarks/int21.py                    # every run, each in its own process, then a table
    python benchmarks/int21.py --runs int2-rtn int2-gptq --steps 10

On the embedded SmolLM2-135M and corpus, the finetune benchmark's data and steps (30 x 2 blocks
of 512, lr 2e-4, warm-up 3, cosine, seed 0), held-out perplexity over every 512-token block:

  fp32                 the untouched model
  intK-rtn / intK-gptq every projection int-K (asymmetric, groups of 128), round to nearest or GPTQ
                       (64 blocks of 512 tokens of the corpus's train split); no training
  int2-gptq-ce         INT2.1's model (GPTQ int2-g128 + LoRA rank 32, alpha 128) trained on CE alone
  int21                the same trained with LREC: KL(fp32 teacher || student) + 0.06 CE
  int21-top64          the same with the KL over the teacher's 64 most likely tokens only
  lqlora-2.5           qft LQ-LoRA, Fisher-weighted, 2.5 bits, rank 64, trained on CE
  lqlora-2.5-lrec      the same trained with LREC

The merged int4 export with and without GPTQ is measured by benchmarks/export_gain.py (on the
finetune benchmark's LQ-LoRA 2.5 run, the same as this one's lqlora-2.5). Reported: seconds to prepare
(GPTQ's time for the whole model is the gptq rows'), s/step, peak RSS while training (teacher
included for LREC runs: the fp32 teacher shares the process).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from finetune import PeakRSS, quantized_bits, run_children, training_arguments
from lqlora import CACHE, OUT, fisher_of

import qft
from qft.training.evaluate import perplexity
from qft.prepare.report import markdown_table

RUNS = ["fp32", "int2-rtn", "int2-gptq", "int3-rtn", "int3-gptq", "int4-rtn", "int4-gptq",
        "int2-gptq-ce", "int21", "int21-top64", "lqlora-2.5", "lqlora-2.5-lrec"]


def prepare(run: str, model, tokenizer):
    if run.startswith("int") and run.endswith(("-rtn", "-gptq")):
        width, rounding = run.split("-")
        return qft.quantize_and_prepare(model, bits=f"{width}-g128", method="qlora", rank=0, rounding=rounding,
                                        tokenizer=tokenizer, progress=False)
    if run in ("int2-gptq-ce", "int21", "int21-top64"):
        return qft.quantize_and_prepare(model, bits=2, method="int21", tokenizer=tokenizer, progress=False)
    if run.startswith("lqlora-2.5"):
        fisher = fisher_of(copy.deepcopy(model), tokenizer)
        return qft.quantize_and_prepare(model, bits=2.5, rank=64, fisher=fisher, cache_dir=CACHE, progress=False)
    raise ValueError(f"unknown run {run!r}; choose from {RUNS}")


def one_run(args) -> dict:
    run = args.runs[0]
    torch.manual_seed(0)
    model, tokenizer = qft.default_model(progress=False)
    row = {"run": run}
    if run == "fp32":
        return {**row, "bits": "32", "ppl": perplexity(model, tokenizer, progress=False)}
    distilled = run in ("int21", "int21-top64", "lqlora-2.5-lrec")
    teacher = qft.default_model(progress=False)[0] if distilled else None
    start = time.perf_counter()
    model = prepare(run, model, tokenizer)
    row["prepare s"] = time.perf_counter() - start
    row["bits"] = f"{quantized_bits(model):.3f}"
    row["ppl"] = perplexity(model, tokenizer, progress=False)
    if not any(p.requires_grad for p in model.parameters()):
        return row
    objective = qft.LREC(top_k=64 if run.endswith("top64") else None) if distilled else "ce"
    with PeakRSS() as rss:
        result = qft.train(model, tokenizer, steps=args.steps, batch_size=args.batch_size, block_size=512, lr=args.lr,
                           warmup=args.warmup, seed=0, progress=False, eval_blocks=0, objective=objective,
                           teacher=teacher)
    row["ppl after"] = perplexity(model, tokenizer, progress=False)
    row["s/step"] = result.seconds_per_step
    row["peak RSS training GB"] = rss.peak / 1e9
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training_arguments(parser, RUNS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args)), flush=True)
        return
    rows = run_children(__file__, args)
    (OUT / "int21.json").write_text(json.dumps(rows, indent=1))
    print(markdown_table(rows, ".3f"))  # untrained runs have fewer columns


if __name__ == "__main__":
    main()
