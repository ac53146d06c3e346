"""CPU dequantization speed of the torch path, per format, on a SmolLM2-sized (1536 x 576) matrix.

    python benchmarks/dequant.py

Prints ms per dequantization, ns per weight, the time it would take for SmolLM2's 106M projection
weights (one training step dequantizes each twice: forward and backward), and one fp32 matmul of
1024 tokens on the same matrix for scale.
"""

from __future__ import annotations

import time

import torch
from lqlora import header

from qft.quant.tensor import QuantizedTensor

FORMATS = ["nf4-b64", "nf3-b64-dq8b256", "nf2-b64-dq8b256", "int4-g64", "int3-g64", "fp8-e4m3-row"]
WEIGHTS = 106_168_320  # SmolLM2-135M's 210 projections


def per_call(fn, repeats: int = 20) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    header()
    torch.manual_seed(0)
    w = torch.randn(1536, 576)
    print("| format | ms per 1536x576 | ns/weight | whole SmolLM2, s |\n|---|---|---|---|")
    for fmt in FORMATS:
        qt = QuantizedTensor.quantize(w, fmt)
        s = per_call(qt.dequantize)
        print(f"| {fmt} | {s * 1e3:.2f} | {s / w.numel() * 1e9:.2f} | {s / w.numel() * WEIGHTS:.3f} |")
    x = torch.randn(1024, 576)
    s = per_call(lambda: x @ w.t())
    print(f"\nfp32 matmul 1024x576 @ 576x1536: {s * 1e3:.2f} ms (whole SmolLM2 at 1024 tokens: "
          f"{s / w.numel() * WEIGHTS:.2f} s)")


if __name__ == "__main__":
    main()
