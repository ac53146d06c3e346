"""Task adapters worth sharing, and ComPEFT on them (issue 25).

    python benchmarks/task_adapters.py [--tasks sst2 arc_easy] [--bits 3.0] [--rank 16] [--max-steps 240]

Base: the embedded SmolLM2-135M with LQ-LoRA at --bits (Fisher-weighted, rank --rank), quantized once and
saved (benchmarks/out/task_adapters/base). Only validation splits ship offline, so each task's documents
are split in two disjoint halves by index: even documents train, odd ones (the first --eval-docs of them)
evaluate. The adapter trains on the training half's texts (each document's prompt followed by its gold
answer, the causal-LM loss; --loss completion: the loss of the answer only, qft.train's pairs, in folders
<task>-completion; blocks of 256 tokens, batch 4, lr --lr constant after 10 warm-up steps), in
rounds of --eval-every steps; after each round the held-out half's accuracy (qft.evaluate_tasks' scoring)
is measured, and training stops when it has not risen for --patience rounds or at --max-steps; the best
round's adapter is kept. Then ComPEFT (qft.compress_adapter; α searched on the training half's texts)
compresses it at each density, and the decompressed adapter's held-out accuracy is measured.
Reported: the .qftc bytes against the adapter in fp16, and the accuracy change. Goal: ≥ 20× at ≤ 1 point.
--alpha-by accuracy has the search maximise the accuracy on the first --select-docs documents of the
training half instead (compress_adapter's score=; the held-out half stays unseen); --scope tensor keeps the
top-k and σ of each tensor instead of the whole adapter's; --reuse compresses the adapter a previous run
trained.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from lqlora import CACHE, OUT, header
from transformers import AutoTokenizer

import qft
from qft.exports.compeft import compress_adapter, decompress_adapter, info
from qft.files.adapters import adapter_tensors
from qft.files.tasks import get_task, task_items
from qft.prepare.report import markdown_table
from qft.training.tasks import score_items

WORK = OUT / "task_adapters"
DENSITIES = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5]


def base_folder(args):
    folder = WORK / f"base-{args.bits}-r{args.rank}"
    if not (folder / "config.json").is_file():
        model, tokenizer = qft.default_model(progress=False)
        qft.quantize_(model, qft.LQLoRAConfig(bits=args.bits, rank=args.rank, fisher=True), tokenizer=tokenizer,
                      cache_dir=CACHE, progress=False)
        qft.save_quantized(model, folder, tokenizer)
    return folder


def load(folder):
    return qft.load_quantized(folder), AutoTokenizer.from_pretrained(folder)


def accuracy(model, tokenizer, items) -> float:
    return score_items(model, tokenizer, items, ("acc",), progress=False)["acc"]


def task_folder(task: str, args) -> Path:
    """Where a task's adapter and files go: one folder per task and training loss."""
    return WORK / (task if args.loss == "text" else f"{task}-completion")


def train_adapter(task: str, args, base: Path, model, tokenizer, data, eval_items) -> dict:
    """Train in rounds until the held-out accuracy stops rising; the best round's adapter is saved (and,
    with --reuse, a previous run's over the same base is loaded instead)."""
    adapter, summary = task_folder(task, args) / "adapter", task_folder(task, args) / "trained.json"
    if args.reuse and summary.is_file():
        trained = json.loads(summary.read_text())
        if trained.get("base") != base.name:
            raise ValueError(f"{summary} was trained over {trained.get('base')}, not {base.name}: run without --reuse")
        qft.load_adapter(model, adapter)
        return trained
    before = accuracy(model, tokenizer, eval_items)
    print(f"{task}: {len(data)} training documents, {len(eval_items)} held out; base accuracy {before:.4f}",
          flush=True)
    best, best_step, stale, step, curve = before, 0, 0, 0, [(0, before)]
    qft.save_adapter(model, adapter)
    start = time.perf_counter()
    while step < args.max_steps and stale < args.patience:
        qft.train(model, tokenizer, data, steps=args.eval_every, batch_size=4, block_size=256, lr=args.lr,
                  warmup=10 if step == 0 else 0, min_lr_ratio=1.0, seed=step, eval_blocks=0, progress=False)
        step += args.eval_every
        acc = accuracy(model, tokenizer, eval_items)
        curve.append((step, acc))
        print(f"  step {step}: held-out accuracy {acc:.4f}", flush=True)
        if acc > best:
            best, best_step, stale = acc, step, 0
            qft.save_adapter(model, adapter)
        else:
            stale += 1
    qft.load_adapter(model, adapter)
    trained = {"base": base.name, "before": before, "best": best, "best_step": best_step, "steps": step, "curve": curve,
               "seconds": time.perf_counter() - start}
    summary.write_text(json.dumps(trained))
    return trained


def compressed(folder: Path, density: float, score, scope: str, base_model, tokenizer, texts, model, base) -> Path:
    """Compress the trained adapter (α searched by ``score``, None: the loss on ``texts``; top-k and σ over
    ``scope``), decompress it and load it into ``model``; the .qftc file."""
    packed = folder / f"adapter-{density}.qftc"
    compress_adapter(folder / "adapter", packed, density=density, base=base_model, tokenizer=tokenizer,
                     texts=texts[:64], score=score, scope=scope, progress=False)
    restored = folder / f"adapter-{density}"
    decompress_adapter(packed, restored, base=base)
    qft.load_adapter(model, restored)
    return packed


def run_task(task: str, args, base) -> list[dict]:
    items = task_items(task)
    train_items, eval_items = items[0::2], items[1::2][: args.eval_docs]
    pairs = [tuple(item.requests[item.gold]) for item in train_items]  # (prompt, the gold answer)
    texts = [prompt + answer for prompt, answer in pairs]
    model, tokenizer = load(base)
    trained = train_adapter(task, args, base, model, tokenizer, pairs if args.loss == "completion" else texts,
                            eval_items)
    best = trained["best"]
    fp16 = 2 * sum(t.numel() for t in adapter_tensors(model).values())
    rows = [{"task": task, "adapter": f"trained, best of {trained['steps']} steps (step {trained['best_step']})",
             "density": 1.0, "bytes": fp16, "× smaller than fp16": 1.0, "held-out acc": best,
             "Δ acc (points)": 0.0, "base acc": trained["before"], "train s": trained["seconds"]}]
    base_model, _ = load(base)
    selection = train_items[: args.select_docs]
    score = (lambda m: accuracy(m, tokenizer, selection)) if args.alpha_by == "accuracy" else None
    for density in args.densities:
        packed = compressed(task_folder(task, args), density, score, args.scope, base_model, tokenizer, texts,
                            model, base)
        acc = accuracy(model, tokenizer, eval_items)
        size = packed.stat().st_size
        alpha = info(packed)["alpha"]
        rows.append({"task": task, "adapter": f"ComPEFT {args.scope}, α {alpha:.3g} (by {args.alpha_by})",
                     "density": density, "bytes": size, "× smaller than fp16": fp16 / size, "held-out acc": acc,
                     "Δ acc (points)": 100 * (acc - best), "base acc": trained["before"]})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["sst2", "arc_easy"])
    parser.add_argument("--bits", type=float, default=3.0)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=240)
    parser.add_argument("--eval-docs", type=int, default=400)
    parser.add_argument("--densities", type=float, nargs="+", default=DENSITIES)
    parser.add_argument("--alpha-by", choices=["loss", "accuracy"], default="loss",
                        help="what α's search maximises: minus the perplexity of the training half's texts (loss: "
                             "compress_adapter's default) or the accuracy on its first --select-docs documents")
    parser.add_argument("--select-docs", type=int, default=200)
    parser.add_argument("--loss", choices=["text", "completion"], default="text",
                        help="train on the whole text (prompt and answer) or on the answer only (qft.train's pairs)")
    parser.add_argument("--scope", choices=["global", "tensor"], default="global",
                        help="ComPEFT's top-k and σ over the whole adapter (the paper's) or per tensor")
    parser.add_argument("--reuse", action="store_true", help="compress the adapter a previous run trained")
    args = parser.parse_args()
    for task in args.tasks:
        get_task(task)
    header()
    torch.manual_seed(0)
    WORK.mkdir(parents=True, exist_ok=True)
    base = base_folder(args)
    rows = []
    for task in args.tasks:
        task_rows = run_task(task, args, base)
        results = task_folder(task, args) / f"results-{args.alpha_by}-{args.scope}.json"
        results.write_text(json.dumps(task_rows, indent=1))
        rows += task_rows
    print(markdown_table(rows, ".4f"))


if __name__ == "__main__":
    main()
