"""HALO's linear layer on one CUDA GPU: forward + backward against bf16, at LLaMA-7B shapes.

    python benchmarks/gpu_halo.py [--tokens 4096 8192 16384]

Per shape (out x in: 4096x4096, 11008x4096) and tokens: the fwd+bwd time of ``F.linear`` in bf16
(cuBLAS) and of ``halo_matmul`` (x and W bf16, dX and dW asked for) at HALO-0/1/2 in FP8 (per-tensor
scales, ``torch._scaled_mm``) and INT8 (``torch._int_mm``); "x bf16" is bf16's time over HALO's
(the issue's goal: >= 1.3x on an H100). ``triton.testing.do_bench`` (CUDA events, median). The rotations
are qft's Triton Walsh-Hadamard transform; the casts are separate torch passes (not fused), so this
measures qft's layer as built, not HALO's fused CUTLASS kernels. Markdown on stdout.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from qft.nn import HaloSettings
from qft.nn.halo import halo_matmul
from qft.prepare.report import markdown_table

SHAPES = [(4096, 4096), (11008, 4096)]  # (out, in)


def fwd_bwd(fn, x, w, dy):
    def step():
        x.grad = w.grad = None
        fn(x, w).backward(dy)
    return do_bench(step, warmup=5, rep=50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    args = parser.parse_args()
    rows = []
    for out_f, in_f in SHAPES:
        for tokens in args.tokens:
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            w = (torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
            dy = torch.randn(tokens, out_f, device="cuda", dtype=torch.bfloat16)
            base = fwd_bwd(lambda a, b: F.linear(a, b), x, w, dy)
            row = {"out x in": f"{out_f}x{in_f}", "tokens": tokens, "bf16 ms": base}
            for precision in ("fp8", "int8"):
                for level in (0, 1, 2):
                    settings = HaloSettings(level, precision)
                    ms = fwd_bwd(lambda a, b: halo_matmul(a, b, settings), x, w, dy)
                    row[f"{precision} HALO-{level} x bf16"] = base / ms
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    print(markdown_table(rows, ".3f"))


if __name__ == "__main__":
    main()
