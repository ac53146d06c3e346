"""Dequant-matmul speed on a GPU: qft's Triton kernels against cuBLAS and bitsandbytes.

    python benchmarks/kernels.py [--batches 1 16 256 4096] [--dtype fp16]

For LLaMA-7B shapes (out x in: 4096x4096, 11008x4096, 4096x11008) and each batch
size: cuBLAS fp16/bf16 on the dense weight, bitsandbytes NF4 (matmul_4bit), and
qft's forward kernel for NF4, NF3, NF2 and int4, plus qft's input-gradient
kernel. Times are medians of triton.testing.do_bench (CUDA events), with the
inputs rotated among several buffers so that repeated runs do not hit in L2.
At batch 1 the achieved bandwidth (packed bytes + activations) / time is given
as a fraction of the measured device-to-device copy bandwidth.

Needs a CUDA GPU (prints a line and exits otherwise).
"""

from __future__ import annotations

import argparse
import time

import torch
from qft.kernels import triton_dequant

from qft.tensor import QuantizedTensor

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in)
FORMATS = ["nf4-b64-dq8b256", "nf3-b64-dq8b256", "nf2-b64-dq8b256", "int4-g128"]
ROTATE = 4


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    from triton.testing import do_bench

    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def bench(fn_for, warmup=25, rep=200) -> float:
    """Median milliseconds of fn_for(i) rotating i over ROTATE input sets."""
    from triton.testing import do_bench

    state = {"i": 0}

    def run():
        fn_for(state["i"] % ROTATE)
        state["i"] += 1

    return do_bench(run, warmup=warmup, rep=rep, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256, 4096])
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU; none here")
        return
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, {time.strftime('%Y-%m-%d')}")
    bandwidth = copy_bandwidth()
    print(f"device-to-device copy: {bandwidth / 1e9:.0f} GB/s")

    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    rows = []
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda") * 0.02
        dense = [w.to(dtype) for _ in range(ROTATE)]
        bnb_w = [bnbf.quantize_4bit(w.to(dtype), quant_type="nf4", blocksize=64) for _ in range(ROTATE)]
        qts = {}
        for name in FORMATS:
            qt = QuantizedTensor.quantize(w.cpu(), name)
            scale, zero = qt.scales()
            qts[name] = (qt, [(qt.codes.cuda(), qt.codebook().cuda(), scale.cuda(),
                               None if zero is None else zero.cuda()) for _ in range(ROTATE)])
        for m in args.batches:
            xs = [torch.randn(m, k, device="cuda", dtype=dtype) for _ in range(ROTATE)]
            dys = [torch.randn(m, n, device="cuda", dtype=dtype) for _ in range(ROTATE)]
            t_cublas = bench(lambda i: xs[i] @ dense[i].t())
            t_bnb = bench(lambda i: bnb.matmul_4bit(xs[i], bnb_w[i][0].t(), quant_state=bnb_w[i][1]))
            row = {"shape": f"{n}x{k}", "batch": m, "cuBLAS ms": t_cublas, "bnb nf4 ms": t_bnb}
            for name, (qt, weights) in qts.items():
                meta = dict(bits=qt.format.bits, cols=k, block=qt.block)
                t = bench(lambda i: triton_dequant.forward(xs[i], *weights[i], **meta))
                row[f"{name} ms"] = t
                row[f"{name} vs cuBLAS"] = t_cublas / t
                if m == 1:
                    moved = qt.nbytes + xs[0].numel() * xs[0].element_size() + n * xs[0].element_size()
                    row[f"{name} of copy bw"] = moved / (t * 1e-3) / bandwidth
                if name.startswith("nf4"):
                    tg = bench(lambda i: triton_dequant.input_grad(dys[i], *weights[i], **meta))
                    row["nf4 input-grad / forward"] = tg / t
            rows.append(row)
            print(row, flush=True)

    from qft.report import markdown_table

    print(markdown_table(rows, ".3f"))


if __name__ == "__main__":
    main()
