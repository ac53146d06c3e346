"""End to end on the embedded SmolLM2-135M-Instruct and corpus:

    quantize at 2.5 bits (Fisher-weighted LQ-LoRA) → train the low-rank factors →
    save → load (same logits, bit for bit) → export merged int4 (compressed-tensors) →
    held-out perplexity at every stage → generate a sample.

    python examples/end_to_end.py                # about 4 minutes on 2 CPU cores, first run
    python examples/end_to_end.py --steps 100 --eval-blocks 0 --out runs/long

Writes OUT/model (qft checkpoint) and OUT/merged-int4 (for vLLM / compressed-tensors).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

import qft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=float, default=2.5)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3, help="LQ-LoRA iterations per matrix")
    parser.add_argument("--fisher-blocks", type=int, default=16,
                        help="calibration blocks of 512 tokens for the Fisher (0: no Fisher weighting)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-blocks", type=int, default=12,
                        help="held-out blocks of 512 tokens per evaluation (0: all of them)")
    parser.add_argument("--out", default="runs/end_to_end")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    progress = not args.quiet
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    out = Path(args.out)
    start = time.perf_counter()
    stages = []

    def evaluate(stage: str, model) -> float:
        ppl = qft.perplexity(model, tokenizer, max_blocks=args.eval_blocks or None, progress=progress)
        stages.append((stage, ppl, time.perf_counter() - start))
        print(f"{stage}: held-out perplexity {ppl:.2f}  ({time.perf_counter() - start:.0f} s)", flush=True)
        return ppl

    model, tokenizer = qft.default_model(progress=progress)
    evaluate("full precision", model)

    fisher = False
    if args.fisher_blocks:
        fisher = qft.empirical_fisher(model, tokenizer, qft.find_target_linears(model), max_blocks=args.fisher_blocks,
                                      progress=progress)
    qft.quantize_and_prepare(model, bits=args.bits, rank=args.rank, fisher=fisher, iters=args.iters, seed=0,
                             progress=progress)
    print(model.qft_report.summary())
    evaluate(f"quantized, {args.bits} bits", model)

    result = qft.train(model, tokenizer, steps=args.steps, batch_size=args.batch_size, block_size=args.block_size,
                       lr=args.lr, warmup=max(1, args.steps // 10), eval_blocks=0, seed=0, progress=progress)
    print(f"trained {result.steps} steps ({result.tokens:,} tokens, {result.seconds_per_step:.1f} s/step, "
          f"{result.trainable_parameters:,} trainable parameters); loss {result.losses[0]:.3f} → {result.losses[-1]:.3f}")
    evaluate("after training", model)

    qft.save_quantized(model, out / "model", tokenizer)
    loaded = qft.load_quantized(out / "model")
    ids = tokenizer("def f(x):\n    return x", return_tensors="pt").input_ids
    with torch.no_grad():
        same = torch.equal(model(ids).logits, loaded(ids).logits)
    print(f"saved to {out / 'model'}; loaded back, logits identical: {same}")
    if not same:
        raise SystemExit("the loaded model differs from the saved one")

    qft.export_merged(loaded, out / "merged-int4", tokenizer)
    # the export is bf16; evaluated with fp32 arithmetic (exact bf16 values), as this CPU has no fast bf16 matmul
    evaluate("merged int4 export", qft.load_merged(out / "merged-int4").float())

    chat = [{"role": "user", "content": "What does the Python `with` statement do?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad(), qft.dense_weights(loaded):  # dequantize once, not once per new token
        generated = loaded.generate(**prompt, max_new_tokens=48, do_sample=False)
    print("sample:", tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True))

    print("\n| stage | held-out perplexity |\n|---|---|")
    for stage, ppl, _ in stages:
        print(f"| {stage} | {ppl:.2f} |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
