"""Quantization error and real bits per parameter of every format family on SmolLM2.

Also checks NF4 (block 64, fp32 scales) code for code against bitsandbytes'
quantize_4bit on the same matrices.

    python benchmarks/formats.py            # prints Markdown tables
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import qft
from qft.quant.packing import unpack

FORMATS = (
    [f"nf{k}-b{b}" for k in (2, 3, 4, 8) for b in (16, 32, 64)]
    + [f"nf{k}-b64-dq8b256" for k in (2, 3, 4)]
    + [f"nf{k}-b64-dq{b0}b{b1}{s}" for k in (2, 3) for b0, b1, s in ((4, 64, ""), (3, 16, "-fp16"), (2, 256, ""))]
    + [f"int{k}-g{g}" for k in (2, 3, 4, 8) for g in (32, 64, 128)]
    + [f"int{k}-ch" for k in (2, 3, 4, 5, 6, 7, 8)]
    + [f"fp8-{kind}-{s}" for kind in ("e4m3", "e5m2") for s in ("row", "tensor")]
)


def bnb_nf4_agreement(weights: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(identical codes, total codes) between qft nf4-b64 and bitsandbytes nf4 block 64."""
    import bitsandbytes.functional as bnbf

    same = total = 0
    for w in weights.values():
        packed, _ = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=False)
        b = packed.flatten()
        theirs = torch.stack([b >> 4, b & 15], dim=1).flatten()[: w.numel()]  # high nibble first
        qt = qft.QuantizedTensor.quantize(w, "nf4-b64")
        ours = unpack(qt.codes, 4, w.shape[1]).flatten()
        same += int((ours == theirs).sum())
        total += w.numel()
    return same, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--formats", nargs="*", default=FORMATS)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()

    model, _ = qft.default_model()
    weights = {n: m.weight.detach() for n, m in qft.find_target_linears(model).items()}
    numel = sum(w.numel() for w in weights.values())
    print(f"# SmolLM2-135M-Instruct: {len(weights)} matrices, {numel / 1e6:.1f}M weights")
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")

    start = time.perf_counter()
    same, total = bnb_nf4_agreement(weights)
    print(f"\nNF4 block 64 vs bitsandbytes quantize_4bit: {same}/{total} identical codes "
          f"({100 * same / total:.4f} %), {time.perf_counter() - start:.1f} s\n")

    start = time.perf_counter()
    rows = qft.quantization_error_table(weights, args.formats, progress=not args.quiet)
    print(qft.prepare.report.markdown_table(rows))
    print(f"\n{len(args.formats)} formats in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
