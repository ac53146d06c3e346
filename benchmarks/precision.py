"""fp32 against bf16 autocast training (TrainConfig.precision) on the embedded SmolLM2-135M and corpus.

    python benchmarks/precision.py                  # both precisions, one after the other, then a table
    python benchmarks/precision.py --device cuda --steps 50

Each precision starts from a freshly loaded model, quantized the same way (NF4,
LoftQ, rank 16), and trains with the same settings, seed and batches. The table
gives held-out perplexity (8 blocks of 256 tokens, evaluated under the run's own
precision) before and after, seconds per training step (evaluation excluded),
and the bf16/fp32 ratio of each, so that one can see whether bf16 pays on this
machine and what it costs in quality.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import qft
from qft.prepare.report import markdown_table

PRECISIONS = ("fp32", "bf16")
SETTINGS = dict(batch_size=2, block_size=256, lr=2e-4, warmup=2, seed=0, eval_blocks=8)


def one_run(precision: str, steps: int, device: str) -> dict:
    torch.manual_seed(0)
    model, tokenizer = qft.default_model(progress=False)
    model = qft.quantize_and_prepare(model, bits="nf4", method="loftq", rank=16, progress=False).to(device)
    result = qft.train(model, tokenizer, steps=steps, precision=precision, progress=False, **SETTINGS)
    return {
        "precision": precision,
        "ppl before": result.evals[0][1],
        "ppl after": result.evals[-1][1],
        "first loss": result.losses[0],
        "last loss": result.losses[-1],
        "s/step": result.seconds_per_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor()
    print(f"# {platform.platform()}, {where or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {args.device}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    print(f"# SmolLM2-135M, NF4 LoftQ rank 16; {args.steps} steps, {SETTINGS}", flush=True)
    rows = []
    for precision in PRECISIONS:
        rows.append(one_run(precision, args.steps, args.device))
        print(rows[-1], flush=True)
    fp32, bf16 = rows
    rows.append({k: "bf16 / fp32" if k == "precision" else bf16[k] / fp32[k] for k in fp32})
    print(markdown_table(rows, ".3f"))


if __name__ == "__main__":
    main()
