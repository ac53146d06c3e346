"""Fine-tuning side by side on the embedded SmolLM2-135M and corpus.

    python benchmarks/finetune.py                 # every run, each in its own process, then a table
    python benchmarks/finetune.py --runs lora lqlora-2.5 --steps 10

Runs (same steps, tokens, seed, schedule, rank 64, scaling 1, all 7 projections of every layer):
  lora        full-precision fp32 model + PEFT LoRA
  qlora-bnb   bitsandbytes NF4 (block 64, double-quantized scales: QLoRA's format) + PEFT LoRA
  qft-nf4     qft's own NF4 (same codes as bitsandbytes, fp32 scales) + qft's LoRA, loaded from a
              qft checkpoint saved by an earlier process (as a user trains a saved model), so
              its peak RSS holds no trace of the fp32 model it was made from
  lqlora-2.5  qft LQ-LoRA, Fisher-weighted, 2.5 bits (ILP allocation)
  lqlora-3.0  the same at 3.0 bits

Every run trains with qft.train (AdamW, warm-up + cosine, clipping) on the train
split and reports held-out perplexity (blocks of 512) before and after, the peak
RSS while training and over the whole process, seconds per step and trainable
parameters. PEFT is needed for the PEFT rows (pip install peft); it is not a qft
dependency.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import threading
import time

import torch
from lqlora import CACHE, OUT, header

import qft
from qft.evaluate import perplexity
from qft.report import markdown_table
from qft.targets import set_module
from qft.train import train

RUNS = ["lora", "qlora-bnb", "qft-nf4", "lqlora-2.5", "lqlora-3.0"]
RANK = 64
NF4_CHECKPOINT = OUT / "qft-nf4-checkpoint"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class PeakRSS:
    """Samples this process's resident memory every 50 ms while active."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        page = resource.getpagesize()
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            self._stop.wait(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def peft_lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=PROJECTIONS))


def bnb_nf4_linears(model):
    """Swap every projection for bitsandbytes' Linear4bit (NF4, block 64, double-quantized scales)."""
    import bitsandbytes as bnb

    for name, layer in qft.find_target_linears(model).items():
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(layer.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     blocksize=64, compress_statistics=True)
        set_module(model, name, q.to("cpu"))
    return model


def prepare(run: str, model, tokenizer):
    if run == "lora":
        return peft_lora(model)
    if run == "qlora-bnb":
        return peft_lora(bnb_nf4_linears(model))
    if run == "qft-nf4":
        return qft.quantize_and_prepare(model, bits="nf4-b64", method="qlora", rank=RANK, progress=False)
    if run.startswith("lqlora-"):
        from lqlora import fisher_of

        fisher = fisher_of(copy.deepcopy(model), tokenizer)
        return qft.quantize_and_prepare(model, bits=float(run.split("-")[1]), rank=RANK, fisher=fisher,
                                        cache_dir=CACHE, progress=False)
    raise ValueError(f"unknown run {run!r}; choose from {RUNS}")


def quantized_bits(model) -> float:
    """Real bits per weight of the qft layers' codes and scales (a loaded model has no report)."""
    layers = [m for m in model.modules() if isinstance(m, qft.QLinear)]
    return 8 * sum(m.weight.nbytes for m in layers) / sum(m.weight.numel() for m in layers)


def save_nf4_checkpoint() -> None:
    model, tokenizer = qft.default_model(progress=False)
    prepare("qft-nf4", model, tokenizer)
    qft.save_quantized(model, NF4_CHECKPOINT, tokenizer)


def one_run(args) -> dict:
    torch.manual_seed(0)
    start = time.perf_counter()
    if args.runs[0] == "qft-nf4":
        from transformers import AutoTokenizer

        model, tokenizer = qft.load_quantized(NF4_CHECKPOINT), AutoTokenizer.from_pretrained(NF4_CHECKPOINT)
    else:
        model, tokenizer = qft.default_model(progress=False)
        model = prepare(args.runs[0], model, tokenizer)
    prepare_s = time.perf_counter() - start
    # bitsandbytes 0.50.2 on CPU: after one no-grad forward, Linear4bit switches to another path whose
    # output differs from its dequantized weight and that passes no gradient to its input (see
    # RESULTS.md), which made its training both faster and wrong. So the "before" perplexity of that
    # run is taken on a copy, and the model trains untouched by inference.
    before = perplexity(copy.deepcopy(model) if args.runs[0] == "qlora-bnb" else model, tokenizer, progress=False)
    with PeakRSS() as rss:
        result = train(model, tokenizer, steps=args.steps, batch_size=args.batch_size, block_size=512,
                       lr=args.lr, warmup=args.warmup, seed=0, progress=False, eval_blocks=0)
    after = perplexity(model, tokenizer, progress=False)
    return {
        "run": args.runs[0],
        "bits": {"lora": "32", "qlora-bnb": "4.127"}.get(args.runs[0]) or f"{quantized_bits(model):.3f}",
        "ppl before": before,
        "ppl after": after,
        "first loss": result.losses[0],
        "last loss": result.losses[-1],
        "s/step": result.seconds_per_step,
        "trainable params": result.trainable_parameters,
        "peak RSS training GB": rss.peak / 1e9,
        "peak RSS process GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,  # KiB on Linux
        "prepare (or load) s": prepare_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=RUNS, choices=RUNS)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save-nf4", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save_nf4:
        save_nf4_checkpoint()
        return
    if args.child:
        print(json.dumps(one_run(args)), flush=True)
        return
    OUT.mkdir(exist_ok=True)
    header()
    print(f"# {args.steps} steps x {args.batch_size} blocks of 512 tokens, lr {args.lr}, warm-up {args.warmup}, "
          f"cosine, rank {RANK}, seed 0", flush=True)
    if "qft-nf4" in args.runs:
        subprocess.run([sys.executable, __file__, "--save-nf4"], check=True)
    rows = []
    for run in args.runs:
        cmd = [sys.executable, __file__, "--child", "--runs", run, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup", str(args.warmup)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{run} failed:\n{out.stderr[-3000:]}", flush=True)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    (OUT / "finetune.json").write_text(json.dumps(rows, indent=1))
    print(markdown_table(rows, ".3f"))


if __name__ == "__main__":
    main()
