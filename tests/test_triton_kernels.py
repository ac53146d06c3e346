"""The Triton dequant-matmul kernels against a float64 reference (TRITON_INTERPRET=1 on CPU, see conftest)."""

import os

import pytest
import torch
from qft.kernels import dequant_matmul, resolve_backend, torch_path, triton_dequant

from qft.nn import QLinear
from qft.tensor import QuantizedTensor

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = [
    "nf2-b16", "nf3-b32", "nf4-b64", "nf8-b64", "nf4-b64-dq8b256", "nf3-b16-dq2b16-fp16",
    "int2-g16", "int3-g32", "int4-g128", "int5-g64", "int7-ch", "int8-ch", "fp8-e4m3-row", "fp8-e5m2-tensor",
]
# METHOD.md: fp32 far under 1e-3; fp16/bf16 operands between 1e-3 and 1e-2.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
SHAPES = [(1, 37, 70), (5, 70, 100), (16, 64, 33), (20, 9, 300), (33, 37, 130)]  # (batch, out, in): all paths


def _case(name, rows, cols, rng):
    w = torch.randn(rows, cols, generator=rng) * 0.05
    qt = QuantizedTensor.quantize(w, name)
    scale, zero = qt.scales()
    args = (qt.codes.to(DEVICE), qt.codebook().to(DEVICE), scale.to(DEVICE), None if zero is None else zero.to(DEVICE))
    return qt, args


def _rel(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all()
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_forward_and_input_grad(name, dtype, m, n, k, rng):
    qt, args = _case(name, n, k, rng)
    meta = dict(bits=qt.format.bits, cols=k, block=qt.block)
    w = qt.dequantize().double().to(DEVICE)
    x = torch.randn(m, k, generator=rng).to(DEVICE, dtype)
    y = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)  # poisoned: every element must be written
    triton_dequant.forward(x, *args, **meta, out=y)
    assert _rel(y, x.double() @ w.t()) < TOLERANCE[dtype]

    dy = torch.randn(m, n, generator=rng).to(DEVICE, dtype)
    dx = torch.full((m, k), float("nan"), device=DEVICE, dtype=dtype)
    triton_dequant.input_grad(dy, *args, **meta, out=dx)
    assert _rel(dx, dy.double() @ w) < TOLERANCE[dtype]


@pytest.mark.parametrize("name", ["nf3-b32-dq8b256", "int4-g32", "fp8-e4m3-row"])
def test_qlinear_triton_backend_matches_torch(name, rng):
    linear = torch.nn.Linear(70, 24)
    lora_b = torch.randn(24, 4, generator=rng) * 0.1  # non-zero, so lora_A's gradient is too
    train_scales = "-dq" not in name  # double-quantized scales are stored as codes: they cannot train
    torch_layer = QLinear.from_linear(linear, name, rank=4, lora_b=lora_b, train_scales=train_scales,
                                      backend="torch").to(DEVICE)
    triton_layer = QLinear.from_state_dict(torch_layer.state_dict(), backend="triton").to(DEVICE)
    assert len(triton_layer.adapters()) == 2 + train_scales
    x = torch.randn(2, 3, 70, generator=rng).to(DEVICE)
    outs = []
    for layer in (torch_layer, triton_layer):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.pow(2).sum().backward()
        outs.append([y, xi.grad, *(p.grad for p in layer.adapters().values())])
    for a, b in zip(*outs):
        assert a.abs().max() > 0
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("QFT_KERNEL_BACKEND", raising=False)
    assert resolve_backend(torch.device("cpu")) == "torch"
    assert resolve_backend(torch.device("cpu"), "torch") == "torch"
    monkeypatch.setenv("QFT_KERNEL_BACKEND", "torch")
    assert resolve_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("QFT_KERNEL_BACKEND", "triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert resolve_backend(torch.device("cpu")) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            resolve_backend(torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown kernel backend"):
        resolve_backend(torch.device("cpu"), "cutlass")


def test_dispatch_forces_either_backend(monkeypatch, rng):
    qt, args = _case("nf4-b64", 24, 70, rng)
    x = torch.randn(4, 70, generator=rng).to(DEVICE)
    meta = dict(bits=4, cols=70, block=64)
    a = dequant_matmul(x, *args, **meta, backend="torch")
    b = dequant_matmul(x, *args, **meta, backend="triton")
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["nf4-b64", "int3-g32", "fp8-e4m3-row"])
@pytest.mark.parametrize("train_scale", [False, True])
def test_autocast_bf16_like_linear(name, train_scale, rng):
    """Under bf16 autocast both backends take x in bf16 and return bf16, as nn.Linear does; the
    scale gradient stays fp32 even when backward itself runs under autocast."""
    qt, (codes, codebook, scale, zero) = _case(name, 24, 70, rng)
    meta = dict(bits=qt.format.bits, cols=70, block=qt.block)
    x = torch.randn(3, 5, 70, generator=rng).to(DEVICE)
    g = torch.randn(3, 5, 24, generator=rng).to(DEVICE)

    # the reference, outside autocast: dequantize in fp32, cast to bf16, multiply exactly (in float64)
    w16 = torch_path.dequantize(codes, codebook, scale, zero, **meta).to(torch.bfloat16).double()
    x16, g16 = x.bfloat16().double(), g.bfloat16().double()  # what the kernels see under autocast
    y_ref, dx_ref = x16 @ w16.t(), g16 @ w16
    s_ref = scale.double().requires_grad_(True)  # dL/dscale of the fp32 weight, for the same x16 and g16
    w_ref = torch_path.dequantize(codes, codebook, s_ref, zero, **meta, dtype=torch.float64)
    ((x16 @ w_ref.t()) * g16).sum().backward()

    ys = []
    for backend in ("torch", "triton"):
        xi = x.clone().requires_grad_(True)
        si = scale.clone().requires_grad_(train_scale)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = dequant_matmul(xi, codes, codebook, si, zero, **meta, backend=backend)
            (y.float() * g).sum().backward()
        assert y.dtype == torch.bfloat16
        assert _rel(y, y_ref) < TOLERANCE[torch.bfloat16]
        assert xi.grad.dtype == torch.float32  # autograd casts x's gradient back, as for nn.Linear
        assert _rel(xi.grad, dx_ref) < TOLERANCE[torch.bfloat16]
        if train_scale:
            assert si.grad.dtype == torch.float32
            assert _rel(si.grad, s_ref.grad) < 1e-4  # fp32 arithmetic, not bf16
        else:
            assert si.grad is None
        ys.append(y)
    assert _rel(ys[0], ys[1]) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_kept_outside_autocast(backend, dtype, rng):
    qt, args = _case("int4-g32", 24, 70, rng)
    x = torch.randn(4, 70, generator=rng).to(DEVICE, dtype).requires_grad_(True)
    y = dequant_matmul(x, *args, bits=4, cols=70, block=32, backend=backend)
    assert y.dtype == dtype
    assert _rel(y, x.detach().double() @ qt.dequantize().double().to(DEVICE).t()) < TOLERANCE[dtype]
    y.sum().backward()
    assert x.grad.dtype == dtype


def test_dispatch_rejects_weight_on_another_device(rng):
    qt, (codes, codebook, scale, zero) = _case("nf4-b64", 24, 70, rng)
    x = torch.randn(4, 70, generator=rng).to(DEVICE)
    with pytest.raises(ValueError, match="codebook is on meta but x is on"):
        dequant_matmul(x, codes, codebook.to("meta"), scale, zero, bits=4, cols=70, block=64)


def test_forward_is_deterministic_and_rejects_bad_out(rng):
    qt, args = _case("nf3-b64-dq8b256", 40, 700, rng)  # long K: split-K path
    x = torch.randn(2, 700, generator=rng).to(DEVICE)
    meta = dict(bits=3, cols=700, block=64)
    a, b = triton_dequant.forward(x, *args, **meta), triton_dequant.forward(x, *args, **meta)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="contiguous"):
        triton_dequant.forward(x, *args, **meta, out=torch.empty(40, 2, device=DEVICE).t())
    xt = torch.randn(700, 2, generator=rng).to(DEVICE).t()  # a non-contiguous input is fine
    y = triton_dequant.forward(xt, *args, **meta)
    assert torch.allclose(y, xt @ qt.dequantize().to(DEVICE).t(), rtol=1e-4, atol=1e-5)
