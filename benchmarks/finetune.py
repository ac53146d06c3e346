"""Fine-tuning side by side on the embedded SmolLM2-135M and corpus.

    python benchmarks/finetune.py                 # every run, each in its own process, then a table
    python benchmarks/finetune.py --runs lora lqlora-2.5 --steps 10
    python benchmarks/finetune.py --runs lora qlora-bnb lqlora-3.0 peqa-int4-ch peqa-int4-g64 peqa-int3-g64 peqa-3.5

Runs (same steps, tokens, seed, schedule, rank 64, scaling 1, all 7 projections of every layer):
  lora        full-precision fp32 model + PEFT LoRA
  qlora-bnb   bitsandbytes NF4 (block 64, double-quantized scales: QLoRA's format) + PEFT LoRA
  qft-nf4     qft's own NF4 (same codes as bitsandbytes, fp32 scales) + qft's LoRA, loaded from a
              qft checkpoint saved by an earlier process (as a user trains a saved model), so
              its peak RSS holds no trace of the fp32 model it was made from
  lqlora-2.5  qft LQ-LoRA, Fisher-weighted, 2.5 bits (ILP allocation)
  lqlora-3.0  the same at 3.0 bits
  peqa-*      qft PEQA (int-k codes and zero-points frozen, scales train): peqa-int4-ch is the
              paper's setting, peqa-int4-g64 / peqa-int3-g64 groups of 64, peqa-3.5 a 3.5-bit
              average with one int-k configuration per matrix from the ILP

Every run trains with qft.train (AdamW, warm-up + cosine, clipping) on the train
split and reports held-out perplexity (blocks of 512) before and after, the peak
RSS while training and over the whole process, seconds per step, trainable
parameters and the adapter's bytes on disk (qft.save_adapter; PEFT's
save_pretrained). qft runs are also exported (qft.export_merged: PEQA keeps its
codes, LoRA-style runs are merged and re-quantized to int4) and the export read
back with qft.load_merged: its perplexity, and the largest logit difference from
the trained model on one held-out block. PEFT is needed for the PEFT rows (pip install peft); it is not a qft
dependency.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from lqlora import CACHE, OUT, header

import qft
from qft.training.evaluate import perplexity
from qft.prepare.report import markdown_table
from qft.nn.targets import set_module
from qft.training.loop import train

RUNS = ["lora", "qlora-bnb", "qft-nf4", "lqlora-2.5", "lqlora-3.0",
        "peqa-int4-ch", "peqa-int4-g64", "peqa-int3-g64", "peqa-3.5"]
RANK = 64
NF4_CHECKPOINT = OUT / "qft-nf4-checkpoint"
PEFT_RUNS = ("lora", "qlora-bnb")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class PeakRSS:
    """Samples this process's resident memory every 50 ms while active: ``peak`` all of it, ``peak_private``
    without the file-backed pages it shares (mapped safetensors files, which the OS can drop and re-read)."""

    def __enter__(self):
        self.peak, self.peak_private, self._stop = 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        page = resource.getpagesize()
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                resident, shared = (int(v) * page for v in f.read().split()[1:3])
            self.peak, self.peak_private = max(self.peak, resident), max(self.peak_private, resident - shared)
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
    if run.startswith("peqa-"):
        spec = run.removeprefix("peqa-")
        bits = spec if spec.startswith("int") else float(spec)
        return qft.quantize_and_prepare(model, bits=bits, method="peqa", cache_dir=CACHE, progress=False)
    raise ValueError(f"unknown run {run!r}; choose from {RUNS}")


def quantized_bits(model) -> float:
    """Bits per weight of the qft layers' formats, codes and stored scales (a loaded model has no report;
    PEQA's trained fp32 scales are its adapter, counted in the adapter bytes)."""
    layers = [m.weight for m in model.modules() if isinstance(m, qft.QLinear)]
    return sum(w.format.storage_bits(w.rows, w.cols) for w in layers) / sum(w.numel() for w in layers)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def adapter_bytes(run: str, model, folder: Path) -> int:
    """The trained parts on disk: PEFT's adapter_model.safetensors, or qft's adapter folder."""
    if run in PEFT_RUNS:
        model.save_pretrained(folder)
        return (folder / "adapter_model.safetensors").stat().st_size
    qft.save_adapter(model, folder)
    return folder_bytes(folder)


def export_check(model, tokenizer, folder: Path) -> tuple[float, float]:
    """(perplexity of the export as load_merged reads it, largest |logit| difference from ``model``
    on one held-out block)."""
    from qft.files.data import default_corpus, token_blocks

    qft.export_merged(model, folder, tokenizer)
    exported = qft.load_merged(folder).float()
    block = token_blocks(tokenizer, default_corpus()["test"]["text"])[:1]
    with torch.no_grad():
        diff = (model(block).logits.float() - exported(block).logits).abs().max().item()
    return perplexity(exported, tokenizer, progress=False), diff


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
    run = args.runs[0]
    keep = OUT / "finetune" / run if args.keep else None
    if keep is not None and run not in PEFT_RUNS:  # the base as prepared: the adapter's starting values
        qft.save_quantized(model, keep / "base", tokenizer)
    # bitsandbytes 0.50.2 on CPU: after one no-grad forward, Linear4bit switches to another path whose
    # output differs from its dequantized weight and that passes no gradient to its input (see
    # RESULTS.md), which made its training both faster and wrong. So the "before" perplexity of that
    # run is taken on a copy, and the model trains untouched by inference.
    before = perplexity(copy.deepcopy(model) if run == "qlora-bnb" else model, tokenizer, progress=False)
    with PeakRSS() as rss:
        result = train(model, tokenizer, steps=args.steps, batch_size=args.batch_size, block_size=512,
                       lr=args.lr, warmup=args.warmup, seed=0, progress=False, eval_blocks=0)
    after = perplexity(model, tokenizer, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        stored = adapter_bytes(run, model, (keep or Path(tmp)) / "adapter")
        export_ppl, export_diff = (None, None) if run in PEFT_RUNS else \
            export_check(model, tokenizer, Path(tmp) / "export")
    return {
        "run": run,
        "bits": {"lora": "32", "qlora-bnb": "4.127"}.get(run) or f"{quantized_bits(model):.3f}",
        "ppl before": before,
        "ppl after": after,
        "export ppl": export_ppl,
        "export max |logit diff|": export_diff,
        "first loss": result.losses[0],
        "last loss": result.losses[-1],
        "s/step": result.seconds_per_step,
        "trainable params": result.trainable_parameters,
        "adapter bytes": stored,
        "peak RSS training GB": rss.peak / 1e9,
        "peak RSS process GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,  # KiB on Linux
        "prepare (or load) s": prepare_s,
    }


def training_arguments(parser: argparse.ArgumentParser, runs: list[str]) -> None:
    """The options every side-by-side training benchmark shares (the finetune benchmark's defaults)."""
    parser.add_argument("--runs", nargs="+", default=runs, choices=runs)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def run_children(script: str, args, extra: tuple[str, ...] = (), setting: str = "") -> list[dict]:
    """Each of ``args.runs`` in a process of its own (a clean peak RSS), as ``script --child``; their rows."""
    OUT.mkdir(exist_ok=True)
    header()
    print(f"# {args.steps} steps x {args.batch_size} blocks of 512 tokens, lr {args.lr}, warm-up {args.warmup}, "
          f"cosine, {setting}seed 0", flush=True)
    rows = []
    for run in args.runs:
        cmd = [sys.executable, script, "--child", "--runs", run, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup", str(args.warmup), *extra]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{run} failed:\n{out.stderr[-3000:]}", flush=True)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training_arguments(parser, RUNS)
    parser.add_argument("--keep", action="store_true",
                        help="keep each run's adapter (and a qft run's base as prepared) in benchmarks/out/finetune/RUN")
    parser.add_argument("--save-nf4", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save_nf4:
        save_nf4_checkpoint()
        return
    if args.child:
        print(json.dumps(one_run(args)), flush=True)
        return
    if "qft-nf4" in args.runs:
        subprocess.run([sys.executable, __file__, "--save-nf4"], check=True)
    rows = run_children(__file__, args, ("--keep",) if args.keep else (), setting=f"rank {RANK}, ")
    (OUT / "finetune.json").write_text(json.dumps(rows, indent=1))
    print(markdown_table(rows, ".3f"))


if __name__ == "__main__":
    main()
