"""The Triton dequant-matmul kernels against a float64 reference (TRITON_INTERPRET=1 on CPU, see conftest).

Without a GPU, autotuning is off and each M bucket runs its first config; ``test_every_config`` pins each
of the others in turn (``config=``), and ``test_kernels_compile_for_h100`` compiles them for sm_90.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_FORMATS
from qft.kernels import torch_path, triton_dequant
from qft.kernels.dispatch import dequant_matmul, resolve_backend

from qft.nn import QLinear
from qft.quant.packing import pack
from qft.quant.tensor import QuantizedTensor

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = [
    "nf2-b16", "nf3-b32", "nf4-b64", "nf8-b64", "nf4-b64-dq8b256", "nf3-b16-dq2b16-fp16",
    "int2-g16", "int3-g32", "int4-g128", "int5-g64", "int7-ch", "int8-ch", "fp8-e4m3-row", "fp8-e5m2-tensor",
]
# METHOD.md: fp32 far under 1e-3; fp16/bf16 operands between 1e-3 and 1e-2.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
# (batch, out, in): every M bucket, odd widths, split K (forward) and split N (input-grad)
SHAPES = [(1, 37, 70), (5, 70, 100), (16, 64, 33), (20, 9, 300), (33, 37, 130), (3, 300, 40), (70, 20, 50)]


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


def _scale_grad_ref(x, dy, codes, codebook, scale, zero, *, bits, cols, block):
    """dL/dscale in float64, the way the kernel must not compute it: the dense dW = dyᵀx times the unscaled
    grid codebook[code] − zero, summed per block (and over broadcast dimensions of scale).

    Also returns Σ|product| per scale: a float sum's error is bounded by the size of its terms, not of its
    result, and these sums cancel (a per-tensor scale adds 13,000 products into a result thousands of
    times smaller than they are)."""
    grid = torch_path._grid(codes, codebook, zero, bits, cols, block).double()  # (rows, blocks, block), padded
    dw = F.pad(dy.double().t() @ x.double(), (0, grid.shape[1] * grid.shape[2] - cols)).view(grid.shape)
    products = dw * grid
    return products.sum(dim=2).sum_to_size(scale.shape), products.abs().sum(dim=2).sum_to_size(scale.shape)


def _summation_error(out, ref_and_size):
    """‖out − ref‖ relative to the summed terms' size (see _scale_grad_ref)."""
    ref, size = ref_and_size
    assert torch.isfinite(out).all()
    return float((out.detach().double() - ref).norm() / size.norm())


# trainable float scales: int-k with zero-points, NF with a codebook, per-group, per-channel, per-tensor
SCALE_GRAD_FORMATS = ["int2-g16", "int3-g32", "int4-g128", "int4-ch", "int8-ch", "nf4-b64", "fp8-e4m3-tensor"]


@pytest.mark.parametrize("name", SCALE_GRAD_FORMATS)
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("m,n,k", [(5, 37, 70), (33, 20, 300), (70, 130, 100)])
def test_scale_grad(name, dtype, m, n, k, rng):
    """Every M bucket, several row and column tiles, blocks not dividing the row (int4-g128 and nf4-b64 at
    300 columns, int2-g16 at 70), one block per row, a (1, 1) scale broadcast over the whole weight."""
    qt, args = _case(name, n, k, rng)
    meta = dict(bits=qt.format.bits, cols=k, block=qt.block)
    x = torch.randn(m, k, generator=rng).to(DEVICE, dtype)
    dy = torch.randn(m, n, generator=rng).to(DEVICE, dtype)
    dscale = triton_dequant.scale_grad(x, dy, *args, **meta)
    scale = args[2]
    assert dscale.shape == scale.shape and dscale.dtype == scale.dtype
    assert _summation_error(dscale, _scale_grad_ref(x, dy, *args, **meta)) < TOLERANCE[dtype]


def test_scale_grad_is_deterministic(rng):
    """Per-tile partial sums added in a fixed order, no atomics: the same inputs give the same bits."""
    qt, args = _case("nf4-b64", 130, 300, rng)
    meta = dict(bits=4, cols=300, block=64)
    x = torch.randn(150, 300, generator=rng).to(DEVICE, torch.float16)
    dy = torch.randn(150, 130, generator=rng).to(DEVICE, torch.float16)
    assert torch.equal(triton_dequant.scale_grad(x, dy, *args, **meta), triton_dequant.scale_grad(x, dy, *args, **meta))


@pytest.mark.parametrize("name", ["int4-ch", "int3-g32", "nf4-b64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qlinear_scale_grad_triton_matches_torch(name, dtype, rng):
    """PEQA (no LoRA, only the scales train): both backends give the same scale gradient for the same
    upstream gradient; x needs no gradient, so the Triton backward runs the scale-grad kernel alone."""
    linear = torch.nn.Linear(130, 40)
    torch_layer = QLinear.from_linear(linear, name, train_scales=True, backend="torch").to(DEVICE)
    triton_layer = QLinear.from_state_dict(torch_layer.state_dict(), backend="triton").to(DEVICE)
    assert list(triton_layer.adapters()) == ["scale"]
    x = torch.randn(2, 9, 130, generator=rng).to(DEVICE, dtype)
    g = torch.randn(2, 9, 40, generator=rng).to(DEVICE)
    grads = []
    for layer in (torch_layer, triton_layer):
        (layer(x).float() * g).sum().backward()
        grads.append(layer.scale.grad)
    assert grads[0].abs().max() > 0
    assert _rel(grads[1], grads[0]) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("name", ["nf3-b32-dq8b256", "int4-g32", "fp8-e4m3-row", "q4_0", "q4_1", "q6_k", "q4_k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qlinear_triton_backend_matches_torch(name, dtype, monkeypatch, rng):
    """A whole QLinear (forward, input and adapter gradients) on either backend. fp32 activations go
    dequantize + matmul on the Triton backend; fp16 ones reach the fused kernels, which is checked."""
    fused = []  # per product: did it run a fused kernel?
    dense = triton_dequant._dense

    def spy(*args):
        fused.append(not dense(*args))
        return not fused[-1]

    monkeypatch.setattr(triton_dequant, "_dense", spy)
    cols = 256 if name.startswith("q") else 70  # llama.cpp's types store whole blocks (256 for the K types)
    linear = torch.nn.Linear(cols, 24)
    lora_b = torch.randn(24, 4, generator=rng) * 0.1  # non-zero, so lora_A's gradient is too
    # double-quantized scales (NF's, the K types' sub-scales) are stored as codes: they cannot train
    train_scales = "-dq" not in name and not name.endswith("_k")
    torch_layer = QLinear.from_linear(linear, name, rank=4, lora_b=lora_b, train_scales=train_scales,
                                      backend="torch").to(DEVICE, dtype)
    triton_layer = QLinear.from_state_dict(torch_layer.state_dict(), backend="triton").to(DEVICE)
    assert len(triton_layer.adapters()) == 2 + train_scales
    x = torch.randn(2, 3, cols, generator=rng).to(DEVICE, dtype)
    outs = []
    for layer in (torch_layer, triton_layer):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.float().pow(2).sum().backward()
        outs.append([y, xi.grad, *(p.grad for p in layer.adapters().values())])
    assert fused and all(fused) == (dtype == torch.float16)
    for a, b in zip(*outs):
        assert a.dtype == b.dtype and a.abs().max() > 0
        if dtype == torch.float32:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        else:
            assert _rel(b, a) < TOLERANCE[dtype]


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
    x = torch.randn(2, 700, generator=rng).to(DEVICE, torch.float16)
    meta = dict(bits=3, cols=700, block=64)
    a, b = triton_dequant.forward(x, *args, **meta), triton_dequant.forward(x, *args, **meta)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="contiguous"):
        triton_dequant.forward(x, *args, **meta, out=torch.empty(40, 2, device=DEVICE, dtype=x.dtype).t())
    xt = torch.randn(700, 2, generator=rng).to(DEVICE, torch.float16).t()  # a non-contiguous input is fine
    y = triton_dequant.forward(xt, *args, **meta)
    assert _rel(y, xt.double() @ qt.dequantize().double().to(DEVICE).t()) < TOLERANCE[torch.float16]


def test_split_partials_reuse_one_buffer(rng):
    """Split-K and split-N partial sums go to one buffer per device and stream, grown when needed."""
    triton_dequant._PARTIALS.clear()
    for n, k, m in [(40, 700, 2), (300, 40, 3), (20, 1100, 1)]:
        qt, args = _case("int4-g32", n, k, rng)
        meta = dict(bits=4, cols=k, block=32)
        w = qt.dequantize().double().to(DEVICE)
        x = torch.randn(m, k, generator=rng).to(DEVICE, torch.float16)
        dy = torch.randn(m, n, generator=rng).to(DEVICE, torch.float16)
        assert _rel(triton_dequant.forward(x, *args, **meta), x.double() @ w.t()) < TOLERANCE[torch.float16]
        assert _rel(triton_dequant.input_grad(dy, *args, **meta), dy.double() @ w) < TOLERANCE[torch.float16]
    assert len(triton_dequant._PARTIALS) == 1


@pytest.mark.parametrize("kernel", ["forward", "input_grad", "scale_grad"])
@pytest.mark.parametrize("bucket", [16, 64, 1024])
def test_every_config(kernel, bucket, rng):
    """Each autotuning candidate, pinned, on odd shapes: in-word and straddling codes, codebook and int-k,
    blocks smaller than, equal to and larger than the tile, per-row scales."""
    table = {"forward": triton_dequant.FORWARD_CONFIGS, "input_grad": triton_dequant.INPUT_GRAD_CONFIGS,
             "scale_grad": triton_dequant.SCALE_GRAD_CONFIGS}[kernel]
    m = {16: 5, 64: 33, 1024: 70}[bucket]
    for config in table[bucket]:
        for name in ["nf2-b16", "nf4-b64", "int4-g128", "nf3-b32", "int5-g64", "int7-ch", "fp8-e4m3-row"]:
            qt, args = _case(name, 37, 300, rng)
            meta = dict(bits=qt.format.bits, cols=300, block=qt.block)
            w = qt.dequantize().double().to(DEVICE)
            x = torch.randn(m, 300, generator=rng).to(DEVICE, torch.float16)
            dy = torch.randn(m, 37, generator=rng).to(DEVICE, torch.float16)
            if kernel == "forward":
                error = _rel(triton_dequant.forward(x, *args, **meta, config=config), x.double() @ w.t())
            elif kernel == "input_grad":
                error = _rel(triton_dequant.input_grad(dy, *args, **meta, config=config), dy.double() @ w)
            else:
                out = triton_dequant.scale_grad(x, dy, *args, **meta, config=config)
                error = _summation_error(out, _scale_grad_ref(x, dy, *args, **meta))
            assert error < TOLERANCE[torch.float16], (config, name)


def _packed(bits, rows, cols, rng, codebook=None):
    """Random codes of every value, a codebook (random unless given), random scales per block of 16."""
    q = torch.randint(0, 1 << bits, (rows, cols), generator=rng)
    book = torch.randn(1 << bits, generator=rng) if codebook is None else codebook
    scale = torch.rand(rows, -(-cols // 16), generator=rng) + 0.5
    return q, book, scale


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("int_k", [False, True])
def test_every_bit_width(bits, int_k, rng):
    """In-word extraction (1, 2, 4, 8 bits) and straddling codes (3, 5, 6, 7), with a codebook gather or,
    for int-k (codebook 0..2^k-1, with zero-points), the code itself."""
    rows, cols = 19, 211
    codebook = torch.arange(1 << bits, dtype=torch.float32) if int_k else None
    q, book, scale = _packed(bits, rows, cols, rng, codebook)
    zero = torch.randint(0, 1 << bits, scale.shape, generator=rng).float() if int_k else None
    w = ((book[q].view(rows, -1) - (0 if zero is None else zero.repeat_interleave(16, 1)[:, :cols]))
         * scale.repeat_interleave(16, 1)[:, :cols]).double().to(DEVICE)
    args = (pack(q, bits).to(DEVICE), book.to(DEVICE), scale.to(DEVICE), None if zero is None else zero.to(DEVICE))
    meta = dict(bits=bits, cols=cols, block=16)
    assert triton_dequant.codes_are_values(args[1]) == int_k
    assert torch.equal(triton_dequant.dequantize(*args, **meta), torch_path.dequantize(*args, **meta))
    for m in (1, 20):
        x = torch.randn(m, cols, generator=rng).to(DEVICE, torch.float16)
        dy = torch.randn(m, rows, generator=rng).to(DEVICE, torch.float16)
        assert _rel(triton_dequant.forward(x, *args, **meta), x.double() @ w.t()) < TOLERANCE[torch.float16]
        assert _rel(triton_dequant.input_grad(dy, *args, **meta), dy.double() @ w) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("name", ["int2-g16", "int3-g32", "int4-g128", "int8-ch"])
def test_int_k_cast_equals_codebook_gather(name, monkeypatch, rng):
    """int-k reads its codes as values (no codebook gather); forcing the gather gives the same bits."""
    qt, args = _case(name, 37, 300, rng)
    meta = dict(bits=qt.format.bits, cols=300, block=qt.block)
    x = torch.randn(5, 300, generator=rng).to(DEVICE, torch.float16)
    assert triton_dequant.codes_are_values(args[1])
    cast = triton_dequant.forward(x, *args, **meta), triton_dequant.dequantize(*args, **meta)
    monkeypatch.setattr(triton_dequant, "codes_are_values", lambda codebook: False)
    gather = triton_dequant.forward(x, *args, **meta), triton_dequant.dequantize(*args, **meta)
    assert all(torch.equal(a, b) for a, b in zip(cast, gather))


def test_codes_are_values_is_asked_once_per_codebook():
    book = torch.arange(16, dtype=torch.float32, device=DEVICE)
    assert triton_dequant.codes_are_values(book)
    book[3] = 7  # an in-place change is seen (the tensor's version moved)
    assert not triton_dequant.codes_are_values(book)
    assert not triton_dequant.codes_are_values(torch.arange(16, device=DEVICE).flip(0).float())
    for name in ["nf4-b64", "fp8-e4m3-row", "fp8-e5m2-tensor"]:
        assert not triton_dequant.codes_are_values(QuantizedTensor.quantize(torch.randn(4, 32), name).codebook())
    n = len(triton_dequant._VALUES_CACHE)
    del book
    assert len(triton_dequant._VALUES_CACHE) == n - 1  # a dead codebook's entry goes with it


@pytest.mark.parametrize("name", ALL_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_equals_torch_path(name, dtype, rng):
    qt, args = _case(name, 37, 300, rng)
    meta = dict(bits=qt.format.bits, cols=300, block=qt.block)
    a = triton_dequant.dequantize(*args, **meta, dtype=dtype)
    b = torch_path.dequantize(*args, **meta, dtype=dtype)
    if dtype == torch.bfloat16 and triton_dequant.INTERPRET:  # the interpreter rounds to bf16 towards zero
        assert torch.allclose(a.float(), b.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_batch_multiplies_a_dequantized_temporary(dtype, monkeypatch, rng):
    """From DENSE_FROM_M rows on (lowered here), the weight is dequantized and cuBLAS multiplies."""
    monkeypatch.setattr(triton_dequant, "DENSE_FROM_M", 8)
    for name in ["nf3-b64-dq8b256", "int4-g128", "fp8-e4m3-row"]:
        qt, args = _case(name, 37, 130, rng)
        meta = dict(bits=qt.format.bits, cols=130, block=qt.block)
        w = qt.dequantize().double().to(DEVICE)
        x = torch.randn(9, 130, generator=rng).to(DEVICE, dtype)
        dy = torch.randn(9, 37, generator=rng).to(DEVICE, dtype)
        y = torch.empty(9, 37, device=DEVICE, dtype=dtype)
        assert triton_dequant.forward(x, *args, **meta, out=y) is y
        assert _rel(y, x.double() @ w.t()) < TOLERANCE[dtype]
        assert _rel(triton_dequant.input_grad(dy, *args, **meta), dy.double() @ w) < TOLERANCE[dtype]


def test_empty_batch_and_short_codebook(rng):
    qt, args = _case("nf4-b64", 24, 70, rng)
    meta = dict(bits=4, cols=70, block=64)
    assert triton_dequant.forward(torch.empty(0, 70, device=DEVICE, dtype=torch.float16), *args, **meta).shape == (0, 24)
    empty_x, empty_dy = torch.empty(0, 70, device=DEVICE), torch.empty(0, 24, device=DEVICE)
    assert torch.equal(triton_dequant.scale_grad(empty_x, empty_dy, *args, **meta), torch.zeros_like(args[2]))
    with pytest.raises(ValueError, match="needs 16 entries"):
        triton_dequant.forward(torch.randn(1, 70, device=DEVICE), args[0], args[1][:8], *args[2:], **meta)


def test_autotune_candidates():
    """Autotuning picks among the M bucket's configs (only the first when off); split shares fit every step."""
    for table, step in ((triton_dequant.FORWARD_CONFIGS, "BK"), (triton_dequant.INPUT_GRAD_CONFIGS, "BN")):
        for bucket, configs in table.items():
            picked = triton_dequant._pick(table, [], {"M_BUCKET": bucket})
            assert picked == (configs if triton_dequant.AUTOTUNE else configs[:1])
            assert all(triton_dequant.SPLIT_UNIT % c.kwargs[step] == 0 for c in configs if bucket <= 64)
            assert all(c.kwargs["BK"] <= triton_dequant.MAX_SCALE_G for c in configs)
    for bucket, configs in triton_dequant.SCALE_GRAD_CONFIGS.items():  # one BK: the partials' width is fixed
        picked = triton_dequant._pick(triton_dequant.SCALE_GRAD_CONFIGS, [], {"M_BUCKET": bucket})
        assert picked == (configs if triton_dequant.AUTOTUNE else configs[:1])
        assert all(c.kwargs["BK"] == triton_dequant.SCALE_GRAD_BK for c in configs)
    assert [triton_dequant._bucket(m) for m in (1, 16, 17, 64, 65, 5000)] == [16, 16, 64, 64, 1024, 1024]


_COMPILE_FOR_H100 = """
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qft.kernels import triton_dequant as td

def signature(fn, act, constexprs):
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name in ("codes_ptr",):
            return "*i32"
        if name.endswith("_ptr"):
            return act if name in ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr", "w_ptr") else "*fp32"
        return "i32"
    return {name: kind(name) for name in fn.arg_names}

def build(fn, act, constexprs, warps, stages):
    src = ASTSource(fn=fn, signature=signature(fn, act, constexprs), constexprs=constexprs)
    done = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    return done.metadata.shared

shared = []
for fmt in [dict(BITS=4, SCALE_G=64, HAS_ZERO=False, CODES_ARE_VALUES=False),
            dict(BITS=3, SCALE_G=32, HAS_ZERO=True, CODES_ARE_VALUES=True)]:
    for kernel, table in ((td._forward_kernel, td.FORWARD_CONFIGS), (td._input_grad_kernel, td.INPUT_GRAD_CONFIGS),
                          (td._scale_grad_kernel, td.SCALE_GRAD_CONFIGS)):
        for configs in table.values():
            for c in configs if fmt["BITS"] == 4 else configs[:1]:
                shared.append(build(kernel.fn, "*bf16", dict(fmt, FP32_DOT=False, **c.kwargs), c.num_warps,
                                    c.num_stages))
    for configs in td.SCALE_GRAD_CONFIGS.values():  # fp32 activations take the fused scale-grad kernel too
        c = configs[0]
        shared.append(build(td._scale_grad_kernel.fn, "*fp32", dict(fmt, FP32_DOT=True, **c.kwargs), c.num_warps,
                            c.num_stages))
    shared.append(build(td._dequantize_kernel, "*bf16", dict(fmt, BN=32, BK=128), 4, 3))
print(json.dumps(shared))
"""


def test_kernels_compile_for_h100():
    """Every config compiles for sm_90 (Triton's own ptxas, no GPU needed) within an H100's shared memory:
    the interpreter runs the kernels' Python, not the GPU compiler."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    shared = json.loads(done.stdout.strip().splitlines()[-1])
    # 4 bits: every config (forward, input-grad, scale-grad), 3 bits: each bucket's first; fp32 scale-grad per
    # bucket; dequantize
    assert len(shared) == (9 + 9 + 7 + 3 + 1) + (3 + 3 + 3 + 3 + 1) and max(shared) <= 227 * 1024


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("m,n,k", [(3, 37, 70), (16, 20, 64)])
def test_an_offset_per_block_is_added_on_either_backend(backend, m, n, k, rng):
    """W = (codebook[code] − zero)·scale + offset (llama.cpp's d·q + m): the dense weight adds it after the
    product; the matmul adds block_sums(x) @ offset.T, and x's gradient sees it."""
    qt, args = _case("int4-g32", n, k, rng)
    offset = (torch.randn(n, qt.format.n_blocks(n, k), generator=rng) * 0.01).to(DEVICE)
    meta = dict(bits=qt.format.bits, cols=k, block=qt.block)
    dense = torch_path.dequantize(*args, **meta, offset=offset)
    assert torch.equal(dense, qt.dequantize().to(DEVICE) + offset.repeat_interleave(qt.block, dim=1)[:, :k])
    x = torch.randn(m, k, generator=rng).to(DEVICE).requires_grad_()
    y = dequant_matmul(x, *args, **meta, backend=backend, offset=offset)
    assert _rel(y, x.double() @ dense.double().t()) < 1e-5
    dy = torch.randn(m, n, generator=rng).to(DEVICE)
    y.backward(dy)
    assert _rel(x.grad, dy.double() @ dense.double()) < 1e-5
