"""The Triton dequant-matmul kernels against a float64 reference (TRITON_INTERPRET=1 on CPU, see conftest)."""

import os

import pytest
import torch
from qft.kernels import dequant_matmul, resolve_backend, triton_dequant

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
    assert torch.isfinite(out).all()
    return float((out.double() - ref).norm() / ref.norm())


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
    torch_layer = QLinear.from_linear(linear, name, rank=4, train_scales=True, backend="torch").to(DEVICE)
    triton_layer = QLinear.from_state_dict(torch_layer.state_dict(), backend="triton").to(DEVICE)
    x = torch.randn(2, 3, 70, generator=rng).to(DEVICE)
    outs = []
    for layer in (torch_layer, triton_layer):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.pow(2).sum().backward()
        outs.append((y, xi.grad, layer.scale.grad, layer.lora_A.grad))
    for a, b in zip(*outs):
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


def test_forward_is_deterministic_and_rejects_bad_out(rng):
    qt, args = _case("nf3-b64-dq8b256", 40, 700, rng)  # long K: split-K path
    x = torch.randn(2, 700, generator=rng).to(DEVICE)
    meta = dict(bits=3, cols=700, block=64)
    a, b = triton_dequant.forward(x, *args, **meta), triton_dequant.forward(x, *args, **meta)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="contiguous"):
        triton_dequant.forward(x, *args, **meta, out=torch.empty(40, 2, device=DEVICE).t())
    xt = torch.randn(700, 2, generator=rng).to(DEVICE).t()  # a non-contiguous input is fine
    assert torch.allclose(triton_dequant.forward(xt, *args, **meta), xt @ qt.dequantize().to(DEVICE).t(), rtol=1e-4, atol=1e-5)
