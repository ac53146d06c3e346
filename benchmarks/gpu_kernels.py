"""Dequant-matmul speed on one CUDA GPU: qft's Triton kernels against cuBLAS bf16 and bitsandbytes NF4.

    python benchmarks/gpu_kernels.py [--batches 1 16 256 4096]

LLaMA-7B shapes (out x in: 4096x4096, 11008x4096, 4096x11008), bf16 activations. Per shape and batch:
cuBLAS (x @ W.T and dy @ W with a dense bf16 W), bitsandbytes NF4 (``matmul_4bit``, block 64,
double-quantized scales, forward only) and qft's forward and input-gradient for each format below
(autotuned; from ``DENSE_FROM_M`` rows on, dequantize + cuBLAS, and the fused kernel is timed too).
For formats whose scales can train (not double-quantized): the scale gradient of PEQA, qft's Triton
kernel ("sgrad ms") against the torch path (its dense fp32 grid, then a chunked reduction; "sgrad x torch"
is the torch path's time over the kernel's).

Times: ``triton.testing.do_bench`` (CUDA events; L2 flushed before every call, which also keeps the
launch queue ahead of the GPU, so Python overhead is not timed), after warm-up, median of the repeats.
Bandwidth: bytes of packed weight and scales + activations read + output written, over the time, as a
fraction of the device's peak HBM bandwidth (PEAK_TBPS; "unknown" for other devices). "rel err": the
forward's ‖y − y_ref‖/‖y_ref‖ against an fp32 matmul on the dequantized weight (checks the autotuned
configs). Markdown on stdout, progress on stderr. Needs a CUDA GPU and bitsandbytes.
"""

from __future__ import annotations

import argparse
import sys

import torch
from qft.kernels import torch_path, triton_dequant

from qft.prepare.report import markdown_table
from qft.quant.tensor import QuantizedTensor

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in)
FORMATS = ["nf4-b64", "nf3-b64-dq8b256", "nf2-b64-dq8b256", "int4-g128", "fp8-e4m3-row"]
# Peak HBM bandwidth (TB/s) from the vendors' data sheets, by a substring of torch.cuda.get_device_name();
# the first match counts.
PEAK_TBPS = [("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0), ("H100", 3.35),
             ("A100-SXM4-80GB", 2.039), ("A100 80GB PCIe", 1.935), ("A100", 1.555)]
DTYPE = torch.bfloat16
DEVICE = "cuda"


def peak_bandwidth(name: str) -> float | None:
    """Bytes per second, or None for a device not in PEAK_TBPS."""
    return next((tbps * 1e12 for key, tbps in PEAK_TBPS if key in name), None)


def time_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def config_name(kernel, m: int) -> str:
    """The tiles the last call used: the autotuner's pick, or the dequantize + cuBLAS path."""
    if m >= triton_dequant.DENSE_FROM_M:
        return "dequant+cuBLAS"
    c = kernel.best_config
    return f"{c.kwargs['BM']}x{c.kwargs['BN']}x{c.kwargs['BK']} w{c.num_warps} s{c.num_stages}"


COLUMNS = ["shape", "batch", "method", "fwd ms", "x cuBLAS", "GB/s", "of peak", "igrad ms", "igrad x cuBLAS",
           "igrad/fwd", "rel err", "fwd config", "fused fwd ms", "fused config", "sgrad ms", "sgrad x torch"]


def row(shape, m, method, ms, moved, peak, **extra):
    """A table row; the forward's bandwidth from the bytes it must move. Missing cells read "–"."""
    bandwidth = moved / (ms * 1e-3)
    cells = {"shape": shape, "batch": m, "method": method, "fwd ms": ms, **extra, "GB/s": bandwidth / 1e9,
             "of peak": "unknown" if peak is None else f"{bandwidth / peak:.0%}"}
    return {c: cells.get(c, "–") for c in COLUMNS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256, 4096])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_kernels.py needs a CUDA GPU; none here")
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    device = torch.cuda.get_device_name()
    peak = peak_bandwidth(device)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows = []
    for n, k in SHAPES:
        shape = f"{n}x{k}"
        w = torch.randn(n, k, device=DEVICE, generator=gen) * 0.02
        dense = w.to(DTYPE)
        packed, state = bnbf.quantize_4bit(dense, blocksize=64, quant_type="nf4", compress_statistics=True)
        bnb_bytes = nbytes(packed, state.absmax, state.state2.absmax, state.state2.code)
        weights = {}
        for name in FORMATS:
            qt = QuantizedTensor.quantize(w, name)
            scale, zero = qt.scales()
            weights[name] = (qt, (qt.codes, qt.codebook(), scale, zero), dict(bits=qt.format.bits, cols=k,
                                                                             block=qt.block))
        for m in args.batches:
            print(f"{shape} batch {m}", file=sys.stderr, flush=True)
            x = torch.randn(m, k, device=DEVICE, generator=gen).to(DTYPE)
            dy = torch.randn(m, n, device=DEVICE, generator=gen).to(DTYPE)
            io = nbytes(x) + m * n * x.element_size()  # activations read + output written (either direction)
            t_cublas = time_ms(lambda: x @ dense.t())
            t_cublas_grad = time_ms(lambda: dy @ dense)
            rows.append(row(shape, m, "cuBLAS bf16", t_cublas, nbytes(dense) + io, peak,
                            **{"x cuBLAS": 1.0, "igrad ms": t_cublas_grad, "igrad/fwd": t_cublas_grad / t_cublas}))
            t_bnb = time_ms(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state))
            rows.append(row(shape, m, "bitsandbytes nf4 (dq)", t_bnb, bnb_bytes + io, peak,
                            **{"x cuBLAS": t_cublas / t_bnb}))
            for name, (qt, weight, meta) in weights.items():
                y = triton_dequant.forward(x, *weight, **meta)
                ref = x.float() @ qt.dequantize(torch.float32).t()
                err = float((y.float() - ref).norm() / ref.norm())
                t = time_ms(lambda: triton_dequant.forward(x, *weight, **meta))
                fwd_config = config_name(triton_dequant._forward_kernel, m)
                t_grad = time_ms(lambda: triton_dequant.input_grad(dy, *weight, **meta))
                extra = {"x cuBLAS": t_cublas / t, "igrad ms": t_grad, "igrad/fwd": t_grad / t,
                         "igrad x cuBLAS": t_cublas_grad / t_grad, "rel err": err, "fwd config": fwd_config}
                if m >= triton_dequant.DENSE_FROM_M:
                    fused = triton_dequant.DENSE_FROM_M
                    triton_dequant.DENSE_FROM_M = m + 1
                    try:
                        extra["fused fwd ms"] = time_ms(lambda: triton_dequant.forward(x, *weight, **meta))
                        extra["fused config"] = config_name(triton_dequant._forward_kernel, m)
                    finally:
                        triton_dequant.DENSE_FROM_M = fused
                if "-dq" not in name:  # double-quantized scales are stored as codes: they cannot train
                    codes, codebook, scale, zero = weight
                    extra["sgrad ms"] = time_ms(lambda: triton_dequant.scale_grad(x, dy, *weight, **meta))
                    t_torch = time_ms(lambda: torch_path.scale_grad(
                        x, dy, torch_path._grid(codes, codebook, zero, meta["bits"], k, meta["block"]), scale, k,
                        meta["block"]))
                    extra["sgrad x torch"] = t_torch / extra["sgrad ms"]
                rows.append(row(shape, m, f"qft {name}", t, qt.nbytes + io, peak, **extra))
    print(f"Device: {device}; peak HBM bandwidth "
          f"{'unknown' if peak is None else f'{peak / 1e12:.2f} TB/s'}; activations bf16; "
          f"qft fused below {triton_dequant.DENSE_FROM_M} rows, dequantize + cuBLAS from there.\n")
    print(markdown_table(rows, ".4g"))


if __name__ == "__main__":
    main()
